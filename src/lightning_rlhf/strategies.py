"""Scale-out from the `hardware` config group: one CPU, one GPU, DDP, DeepSpeed ZeRO-1/2/3 (+ offload).

`make_strategy(hw)` turns a validated HardwareConfig into what `lightning.Trainer(strategy=...)` takes.
DeepSpeed runs through `ZeroStrategy`, a Lightning DeepSpeedStrategy that also accepts a CPU
accelerator (DeepSpeed's CPU accelerator with the gloo backend), so the test suite exercises the same
ZeRO code path as a GPU cluster. The ZeRO knobs users tune live in `hardware.deepspeed` and are mapped
onto DeepSpeed's JSON config by `deepspeed_config`.

What the PPO module asks of a strategy (all no-ops on one process):
- `micro_batch_context`: gradients sync once per optimizer step, not once per micro-batch;
- `rollout_context`: ZeRO-3 gathers the policy once per rollout instead of layer by layer per token;
- `prepare_frozen`: the reference and reward models stay out of the training engine (never in the
  optimizer); ZeRO-3 shards them in inference-only engines;
- `rank_seed`: each rank samples its own completions.

Importing this module does not import deepspeed.
"""

from __future__ import annotations

import argparse
import copy
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed
from torch import nn

from lightning_rlhf.config import DeepSpeedConfig, HardwareConfig

NO_PRINT = 2**62  # DeepSpeed's steps_per_print: keep its progress lines out of the logs
CHECKPOINT_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under


# ---- from the config ---------------------------------------------------------------------------
def resolve_accelerator(hw: HardwareConfig) -> str:
    """cpu | gpu: `auto` means a GPU when CUDA is available."""
    if hw.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if hw.accelerator in ("gpu", "cuda") else "cpu"


def resolve_precision(hw: HardwareConfig) -> str:
    """Lightning's precision flag; `auto` means bf16-mixed on GPUs that support it, else 32-true."""
    if hw.precision != "auto":
        return str(hw.precision)
    gpu = resolve_accelerator(hw) == "gpu" and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def make_strategy(hw: HardwareConfig):
    """The `strategy=` argument of the Trainer for hardware.strategy = auto | ddp | deepspeed."""
    if hw.strategy == "auto":
        return "auto"
    cpu = resolve_accelerator(hw) == "cpu"
    backend = hw.process_group_backend or ("gloo" if cpu else None)
    if hw.strategy == "ddp":
        return DDPStrategy(process_group_backend=backend)
    if cpu:  # must be set before deepspeed picks its accelerator (at its first use)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ZeroStrategy(hw.deepspeed, gpu=not cpu, process_group_backend=backend)


def deepspeed_config(ds: DeepSpeedConfig, gpu: bool = True) -> dict[str, Any]:
    """DeepSpeed's JSON config for the training engine, from hardware.deepspeed."""
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "contiguous_gradients": ds.contiguous_gradients,
        # DeepSpeed overlaps reduction with backward only where gradients are partitioned (stage >= 2)
        "overlap_comm": ds.overlap_comm and ds.stage >= 2,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "reduce_scatter": True,
    }
    if ds.stage < 3:
        zero |= {"allgather_bucket_size": ds.allgather_bucket_size, "allgather_partitions": True}
    else:
        zero |= {
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_max_live_parameters": ds.max_live_parameters,
        }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    config = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # a torch optimizer over offloaded state is allowed (the SFT and RM stages build their own AdamW;
        # PPO uses DeepSpeedCPUAdam when hardware.deepspeed.cpu_adam: see make_optimizer)
        "zero_force_ds_cpu_optimizer": False,
        # the PPO module runs several backward passes per optimizer step: backward() only accumulates,
        # step() is the accumulation boundary (reduction + update)
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size or 1,  # DeepSpeed's throughput log only
        "steps_per_print": NO_PRINT,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, ds.config or {})


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each (seed, rank), collision-free across seeds (unlike seed + rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def skip_cpu_shm_comm_build() -> None:
    """deepspeed.comm, started on DeepSpeed's CPU accelerator, compiles a shared-memory all-reduce op
    (C++, ~45 s on this machine, a compiler needed) for DeepSpeed's *inference* all-reduce. ZeRO's
    collectives go through torch.distributed (gloo) and never use it, so it is marked incompatible before
    deepspeed.comm starts, which then skips it (`__compatible_ops__` is DeepSpeed's one dict of what may
    be built, probed at first access)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


# ---- DeepSpeed on any accelerator --------------------------------------------------------------
class ZeroStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on CUDA or CPU, configured from `hardware.deepspeed`.

    On CPU it skips the "CUDA only" check and the device-index validation (CPU devices have no index)
    and hands DeepSpeed the local rank as its device rank. It also keeps the inference-only engines
    of the frozen models (ZeRO-3), and at the end of `fit` turns ZeRO-3-partitioned models back into
    ordinary modules on every rank, so that evaluation and `save_pretrained` after training behave as
    on one process (save ZeRO checkpoints *during* fit, e.g. with ModelCheckpoint).
    """

    strategy_name = "deepspeed_any_device"

    def __init__(self, ds: DeepSpeedConfig, gpu: bool = True, **kwargs):
        super().__init__(config=deepspeed_config(ds, gpu), **kwargs)
        self.ds = ds
        self._frozen_engines: list = []

    @property
    def zero_stage(self) -> int:
        return self.ds.stage

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        skip_cpu_shm_comm_build()
        self._init_deepspeed_distributed()

    def _device_rank(self) -> int:
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """An inference-only model on this rank's device, in the policy's compute dtype when DeepSpeed
        trains in bf16/fp16. Under ZeRO-3 (hardware.deepspeed.shard_frozen_models) its parameters are
        partitioned over the ranks in an engine without an optimizer; DeepSpeed's hooks gather them
        layer by layer in each forward (once per micro-batch, not per token: the frozen models score
        whole sequences)."""
        if not any(True for _ in model.parameters()):  # e.g. a reward function, a LoRA policy's reference
            return model
        if not (self.zero_stage == 3 and self.ds.shard_frozen_models):
            dtype = getattr(self.precision_plugin, "_desired_dtype", None)
            half = {"dtype": dtype} if dtype in (torch.bfloat16, torch.float16) else {}
            return model.to(self.root_device, **half)
        import deepspeed

        zero = {k: v for k, v in self.config["zero_optimization"].items()
                if k == "stage" or k.startswith("stage3_") or k == "offload_param"}
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "steps_per_print": NO_PRINT}
        for key in ("bf16", "fp16"):
            if key in self.config:
                config[key] = self.config[key]
        engine, *_ = deepspeed.initialize(args=argparse.Namespace(device_rank=self._device_rank()), model=model,
                                          config=config, dist_init_required=False)
        engine.eval()
        self._frozen_engines.append(engine)
        return engine.module

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Announce a forward + backward pass that does not go through the engine's forward.

        DeepSpeed's ZeRO optimizers count micro-steps (and, at stage 1-2, reset per-backward gradient
        buffers) in `engine.forward`; the PPO module calls the policy directly, several times per
        training step, so it tells the optimizer here. Without it, ZeRO-3 keeps only the last
        micro-batch's gradient and ZeRO-2 carries gradients over into the next optimizer step.
        Gradients accumulate locally and are reduced in step() (managed_gradient_accumulation=false).
        """
        optimizer = self.deepspeed_engine.optimizer
        clear = getattr(optimizer, "clear_backward_seen_flag", None)
        if clear is None:  # never skip it silently: ZeRO would then keep or carry the wrong gradients
            import deepspeed

            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: {type(optimizer).__name__} has no "
                               "clear_backward_seen_flag(), which gradient accumulation under ZeRO relies on here "
                               "(tested with the version in constraints.txt; tests/unit/test_private_apis.py)")
        clear()
        yield

    @contextmanager
    def gathered_policy(self) -> Iterator[None]:
        """ZeRO-3: the training engine's parameters gathered once, DeepSpeed's per-layer hooks off.

        Holds the full policy (in its compute dtype) on every rank until the context exits, on top of
        the shards: e.g. 2 bytes x 7e9 = 14 GB per GPU for a 7B bf16 policy, plus the KV cache.
        """
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        _release_all(self.deepspeed_engine)  # settle parameters still prefetched by the last update
        with unwrap_model_for_generation(self.deepspeed_engine):
            yield

    def teardown(self) -> None:
        import deepspeed

        if self.zero_stage == 3 and isinstance(self.model, deepspeed.DeepSpeedEngine):  # not after a failed init
            for engine in [self.model, *self._frozen_engines]:
                _materialize(engine)
        self._frozen_engines = []
        super().teardown()


def _zero3_offload(engine):
    """The object that owns an engine's ZeRO-3 parameter hooks (the training or an inference engine)."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


def _release_all(engine) -> None:
    """Partition every parameter of a ZeRO-3 engine, waiting for prefetches still in flight."""
    _zero3_offload(engine).partition_all_parameters()


def _materialize(engine) -> None:
    """Replace the ZeRO-3-partitioned parameters of `engine.module` by full ordinary Parameters (on
    CPU, one module at a time to bound device memory) and remove DeepSpeed's module hooks."""
    import deepspeed

    module = engine.module
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        return
    _release_all(engine)
    full: dict[int, nn.Parameter] = {}
    for sub in module.modules():  # same order on every rank: the gathers are collective
        params = [p for p in sub.parameters(recurse=False) if hasattr(p, "ds_id") and id(p) not in full]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params):
            for p in params:
                full[id(p)] = nn.Parameter(p.data.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    _zero3_offload(engine)._remove_module_hooks()
    for sub in list(module.modules()):
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) in full:
                setattr(sub, name, full[id(p)])


# ---- what the PPO module calls (strategy-agnostic) ---------------------------------------------
def micro_batch_context(trainer, sync: bool):
    """Around a micro-batch's forward and backward (several per optimizer step, all inside one
    training_step). DDP: `no_sync` unless `sync` (the last micro-batch before the step), so gradients
    are all-reduced once per step. DeepSpeed: see ZeroStrategy.micro_batch."""
    strategy = trainer.strategy
    if isinstance(strategy, ZeroStrategy):
        return strategy.micro_batch()
    model = getattr(strategy, "model", None)
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def rollout_context(trainer):
    """Around a rollout: ZeRO-3 gathers the policy once (hardware.deepspeed.gather_for_generation)."""
    strategy = trainer.strategy
    if isinstance(strategy, ZeroStrategy) and strategy.zero_stage == 3 and strategy.ds.gather_for_generation:
        return strategy.gathered_policy()
    return nullcontext()


def prepare_frozen(trainer, model: nn.Module) -> nn.Module:
    """Place an inference-only model for this strategy (see ZeroStrategy.prepare_frozen)."""
    strategy = trainer.strategy
    if isinstance(strategy, ZeroStrategy):
        return strategy.prepare_frozen(model)
    return model.to(strategy.root_device)


def set_gradient_clipping(trainer, max_norm: float | None) -> None:
    """DeepSpeed clips inside its step (Lightning's clip_gradients is a no-op there): configure it
    before the engine is built (from configure_optimizers)."""
    if isinstance(trainer.strategy, ZeroStrategy):
        trainer.strategy.config["gradient_clipping"] = float(max_norm or 0.0)


def make_optimizer(trainer, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; DeepSpeedCPUAdam (AdamW mode) when the optimizer is offloaded with cpu_adam=true."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, ZeroStrategy) and strategy.ds.offload_optimizer and strategy.ds.cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    # fused: one kernel over all parameters (the default per-parameter loop costs ~1 ms a step on CPU
    # for the tiny demo policy, 4x the fused step; bench/RESULTS.md "Speed ablations")
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# ---- checkpoints -------------------------------------------------------------------------------
def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the LightningModule in a checkpoint saved under any strategy:
    a DeepSpeed checkpoint folder (ZeRO-1/2/3 shards, consolidated on CPU) or a Lightning .ckpt file."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=CHECKPOINT_TAG))
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def export_policy(checkpoint: str | Path, policy: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Load a checkpoint's `policy.*` weights into `policy` (built like the trained one, e.g. with
    models.lora.build_policy_and_ref) and save it as a Hugging Face folder (value head beside it)."""
    state = {k.removeprefix("policy."): v for k, v in consolidated_state_dict(checkpoint).items()
             if k.startswith("policy.")}
    missing, unexpected = policy.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(policy, k, state)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{checkpoint}: policy weights do not match: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {unexpected[:5]}")
    policy.save_pretrained(folder, tokenizer)
    return Path(folder)


def _is_tied(model: nn.Module, key: str, state: dict) -> bool:
    """True when parameter `key` is the same tensor as a parameter present in `state` (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(params.get(k) is target for k in state)


def _export_main(argv: list[str] | None = None) -> None:
    """python -m lightning_rlhf.strategies export CHECKPOINT BASE_MODEL OUT

    CHECKPOINT: a PPO checkpoint from any strategy (a DeepSpeed folder or a .ckpt file); BASE_MODEL: a
    Hugging Face folder with the policy's architecture and tokenizer (e.g. the run's sft/model or policy/);
    OUT: the Hugging Face folder to write (policy weights + value_head.pt). Full (non-LoRA) policies.
    """
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlhf.models.policy import PolicyWithValueHead

    parser = argparse.ArgumentParser(prog="python -m lightning_rlhf.strategies", description=_export_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export"])
    parser.add_argument("checkpoint")
    parser.add_argument("base_model")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    policy = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(args.base_model))
    print(export_policy(args.checkpoint, policy, args.out, AutoTokenizer.from_pretrained(args.base_model)))


if __name__ == "__main__":
    _export_main()
