"""The private or version-specific library APIs the code relies on exist in the installed (pinned)
versions. An upgrade that removes one fails here, by name, instead of silently changing the maths."""

from __future__ import annotations

import inspect

import pytest
import torch


def test_zero_optimizers_have_the_backward_seen_flag():
    """strategies.ZeroStrategy.micro_batch clears it before each micro-batch: without it ZeRO-3 keeps only
    the last micro-batch's gradient and ZeRO-2 carries gradients into the next step."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert callable(getattr(cls, "clear_backward_seen_flag", None)), cls.__name__


def test_deepspeed_engine_counts_skipped_steps():
    """nonfinite.NonFiniteGuard counts DeepSpeed's overflow skips from engine.skipped_steps."""
    pytest.importorskip("deepspeed")
    from deepspeed import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    assert "self.skipped_steps = 0" in source and "self.skipped_steps += 1" in source


def test_zero3_helpers_exist():
    """strategies._release_all / _materialize: partition_all_parameters and _remove_module_hooks."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation  # noqa: F401 (gathered_policy)

    assert callable(getattr(DeepSpeedZeRoOffload, "partition_all_parameters", None))
    assert callable(getattr(DeepSpeedZeRoOffload, "_remove_module_hooks", None))


def test_lightning_logging_step_and_precision_dtype():
    """metrics.publish_metrics reads the training loop's _batches_that_stepped (Lightning's logging
    step); ZeroStrategy.prepare_frozen reads the DeepSpeed precision plugin's _desired_dtype."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.plugins.precision.deepspeed import DeepSpeedPrecision

    assert "_batches_that_stepped" in inspect.getsource(_TrainingEpochLoop.__init__)
    assert DeepSpeedPrecision("32-true")._desired_dtype == torch.float32
