"""Reads an offline W&B run (`<dir>/wandb/offline-run-*/run-<id>.wandb`) back: the run record
(config, group, tags), every history row, the summary, the exit code and the table files.

The .wandb file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then the
LevelDB log format (32 KiB blocks; records of crc32 (4), length (2), type (1) and data, split over
blocks as FIRST / MIDDLE / LAST or whole as FULL), each holding one protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at a block's end
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    group: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None

    def tables(self, name: str) -> list[dict]:
        """The logged W&B tables `name`, oldest first, each as {columns, data}."""
        files = sorted((self.folder / "files" / "media" / "table").glob(f"{name}_*.table.json"),
                       key=lambda p: int(p.name.split("_")[-2]))
        return [json.loads(p.read_text()) for p in files]

    def series(self, key: str, step: str) -> list[tuple[float, float]]:
        return [(row[step], row[key]) for row in self.history if key in row and step in row]


def read_offline_run(folder: Path) -> OfflineRun:
    folder = Path(folder)
    (log_file,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for r in records(log_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.tags = r.run.run_id, r.run.run_group, list(r.run.tags)
            run.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update if _key(i)})
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
