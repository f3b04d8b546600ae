"""The fused Llama layers and the decode step as C++ (`csrc/fused_layers.cpp`): build, load and switch.

The C++ calls the same ATen operators in the same order on the same operands as its Python twins
(`llama.layers_forward`, `llama._FusedLayers.backward`, `decoder.decode_step`), so every output and
gradient is bit-identical (tests/unit/test_native.py); `make demo` gives the same numbers either way.
`llama.NativeLayers` is its autograd node. What it removes is the Python interpreter between the
~1,000 small operators of an optimizer step on a small model: 4-7 % of a GRPO optimizer step, 15 % of
sampling and ~10 % of a DPO iteration on the benchmark's tiny Llama (bench/RESULTS.md, "The C++ fast
path adopted").

Built once with `torch.utils.cpp_extension` (a C++ compiler and ninja; ~30 s on 2 cores) into
`$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), in a folder keyed by the source, torch and
Python versions; `make setup` builds it (`python -m lightning_rlhf.models.fast`), else the first use
does. A built module is imported directly (no compiler, ninja or lock needed); a build runs under an
OS file lock, released when its process dies, so a killed build never leaves later runs waiting.
A failed build leaves `build_failed` (its error) in that folder, and later processes do not retry it.
The environment variable LIGHTNING_RLHF_NATIVE chooses:
- unset or "auto": used when built or when it builds; else one warning and the Python twin;
- "0": never (the Python twin);
- "1": required (retries a failed build; raises if it fails).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_layers.cpp"
ENV = "LIGHTNING_RLHF_NATIVE"
CFLAGS = ["-O3"]
FAILED = "build_failed"  # in the build folder: the error of a failed build
_UNSET = object()
_extension = _UNSET  # the loaded module, None when unavailable (this process decides once)


def mode() -> str:
    """LIGHTNING_RLHF_NATIVE as one of "auto", "0", "1" (anything else names the variable in an error)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 (never use the C++ fast path), 1 (require it) or auto")
    return value


def build_directory() -> Path:
    """Where this source, for this torch and Python, is built: a new key rebuilds instead of loading a stale one."""
    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__}|{sys.version}|{CFLAGS}".encode()).hexdigest()
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")).expanduser()
    return root / f"lightning_rlhf_native_{key[:16]}"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(retry_failed: bool = False, verbose: bool = False):
    """Import the built extension, building it first where needed. Raises what the build raised (or, without
    `retry_failed`, the error recorded by an earlier failed build)."""
    directory = build_directory()
    built = directory / f"{directory.name}.so"
    if built.exists():  # the common case: no compiler, ninja or lock involved
        return _import(built)
    failed = directory / FAILED
    if failed.exists() and not retry_failed:
        raise RuntimeError(f"an earlier build failed ({failed}; delete it, or set {ENV}=1, to retry): "
                           f"{failed.read_text().strip()[-500:]}")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lightning_rlhf.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (DDP ranks); released if this process dies
        if built.exists():  # another process built it while this one waited
            return _import(built)
        (directory / "lock").unlink(missing_ok=True)  # torch's own lock, stale if a build was killed
        print(f"lightning-rlhf: building the C++ fused layers once into {directory} (~30 s)", file=sys.stderr,
              flush=True)
        from torch.utils.cpp_extension import load as cpp_load

        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])  # the venv's ninja
        try:
            module = cpp_load(directory.name, [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(directory),
                              verbose=verbose)
        except Exception as err:
            failed.write_text(f"{type(err).__name__}: {err}\n")
            raise
        finally:
            os.environ["PATH"] = path
        failed.unlink(missing_ok=True)
        return module


def extension():
    """The compiled module, or None where LIGHTNING_RLHF_NATIVE=0 or (auto) it is not built and does not build."""
    global _extension
    choice = mode()
    if choice == "0":
        return None
    if _extension is _UNSET:
        try:
            _extension = load(retry_failed=choice == "1")
        except Exception as err:  # noqa: BLE001: no compiler, no ninja, a failed build: the Python twin runs
            if choice == "1":
                raise RuntimeError(f"{ENV}=1 but the C++ fused layers did not build: {err}") from err
            warnings.warn(f"lightning-rlhf: the C++ fused layers are unavailable ({type(err).__name__}: {err}); "
                          f"using the Python twin (set {ENV}=0 to skip the attempt)", stacklevel=2)
            _extension = None
    if _extension is None and choice == "1":
        raise RuntimeError(f"{ENV}=1 but the C++ fused layers are unavailable in this process")
    return _extension
