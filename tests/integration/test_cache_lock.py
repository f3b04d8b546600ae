"""The stage cache's lock: a job that needs an entry another job is training waits for it and reuses
it instead of training it again; the other ranks of a multi-process job follow rank 0's decision."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lightning_rlhf.stages import cache
from lightning_rlhf.stages.cache import entry_lock, lookup, run_stage, store
from tests.conftest import tiny_run_config

KEY = "0123456789abcdef"


def _cfg(tmp_path):
    return tiny_run_config(stage="pipeline", run_dir=str(tmp_path / "run"), cache={"dir": str(tmp_path / "cache")})


def _model_folder(path):
    """A stage folder as training leaves it: path/model/."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "weights.bin").write_text("w")
    return path


def _wait_until(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_job_waits_for_the_entry_another_job_is_training_and_reuses_it(tmp_path):
    cfg = _cfg(tmp_path)
    holding, release = threading.Event(), threading.Event()

    def other_job():  # holds the entry's lock while it "trains", then stores the entry
        with entry_lock(cfg, "sft", KEY):
            holding.set()
            release.wait(10)
            store(cfg, "sft", KEY, _model_folder(tmp_path / "other"), {"sft_loss": 1.5})

    calls, result = [], {}
    trainer = threading.Thread(target=other_job)
    trainer.start()
    holding.wait(10)
    waiter = threading.Thread(target=lambda: result.update(run_stage(
        cfg, "sft", tmp_path / "run" / "sft", lambda: calls.append(1) or {"sft_loss": 9.9}, KEY)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and lookup(cfg, "sft", KEY) is None  # waiting on the lock, nothing trained
    release.set()
    trainer.join(10)
    waiter.join(10)
    assert calls == [] and result["reused"] and result["sft_loss"] == 1.5
    assert (tmp_path / "run" / "sft").resolve() == cache.entry_dir(cfg, "sft", KEY).resolve()
    assert "pid" in (tmp_path / "cache" / "locks" / f"sft-{KEY}.lock").read_text()


def test_the_first_job_trains_and_stores_under_the_lock(tmp_path):
    cfg = _cfg(tmp_path)
    folder = tmp_path / "run" / "sft"
    def train():
        _model_folder(folder)
        return {"sft_loss": 2.0}

    summary = run_stage(cfg, "sft", folder, train, KEY)
    assert summary == {"sft_loss": 2.0, "reused": False}
    assert lookup(cfg, "sft", KEY)["sft_loss"] == 2.0
    assert json.loads((tmp_path / "run" / ".sft.cache.json").read_text()) == {"key": KEY, "decision": "train"}
    again = run_stage(cfg, "sft", tmp_path / "run2" / "sft", lambda: pytest.fail("trained twice"), KEY)
    assert again["reused"] and again["sft_loss"] == 2.0


@pytest.mark.parametrize("decision", ["train", "reuse"])
def test_other_ranks_follow_rank_zero(tmp_path, monkeypatch, decision):
    cfg = _cfg(tmp_path)
    folder = tmp_path / "run" / "sft"
    if decision == "reuse":  # an entry rank 0 decided to reuse
        store(cfg, "sft", KEY, _model_folder(tmp_path / "other"), {"sft_loss": 1.0})
    monkeypatch.setattr(cache, "is_rank_zero", lambda: False)
    calls, result = [], {}
    rank1 = threading.Thread(target=lambda: result.update(run_stage(
        cfg, "sft", folder, lambda: calls.append(1) or {"sft_loss": 3.0}, KEY)))
    rank1.start()
    time.sleep(0.7)
    assert rank1.is_alive(), "rank 1 waits for rank 0's decision, even with an entry in the cache"
    folder.parent.mkdir(parents=True)
    (folder.parent / ".sft.cache.json").write_text(json.dumps({"key": KEY, "decision": decision}))
    _wait_until(lambda: not rank1.is_alive())
    assert (calls == [1]) == (decision == "train") and result["reused"] == (decision == "reuse")
