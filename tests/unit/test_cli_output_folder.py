"""cli.check_writable: the output folder's problems named before Hydra makes it (a full disk cannot be
made on demand here, so it is simulated: a write that fails with ENOSPC, and a disk with little room)."""

from __future__ import annotations

import errno
import os

import pytest

from lightning_rlhf import cli
from lightning_rlhf.config import ConfigError


def test_a_writable_folder_passes_and_nothing_is_left_behind(tmp_path):
    cli.check_writable("hydra.run.dir", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, no folder made


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli.os, "fsync", full)
    with pytest.raises(ConfigError, match=rf"hydra.run.dir: cannot write in {tmp_path} \(No space left on device\)"):
        cli.check_writable("hydra.run.dir", tmp_path / "run")


def test_a_nearly_full_disk_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: type("U", (), {"free": 5 * 2**20})())
    with pytest.raises(ConfigError, match=r"hydra.sweep.dir: the disk of .* has 5.0 MiB free, less than the 64 MiB"):
        cli.check_writable("hydra.sweep.dir", tmp_path / "sweep")


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"hydra.run.dir: .*/f is a file"):
        cli.check_writable("hydra.run.dir", tmp_path / "f" / "run")
