"""The fused Llama layers and the decode step as C++ (`native/fused_layers.cpp`), an optional fast path.

The C++ calls the same ATen operators in the same order on the same operands as its Python twins
(`llama.layers_forward`, `llama._FusedLayers.backward`, `decoder.decode_step`), so every output and
gradient is bit-identical (tests/unit/test_native.py); `make demo` gives the same numbers either way.
`llama.NativeLayers` is the autograd node. What it removes is the Python interpreter between the ~1,000 small operators of an optimizer step on
a small model: 8-9 % of a GRPO step on the benchmark's tiny Llama (bench/RESULTS.md, "A C++ trunk").

Built once with `torch.utils.cpp_extension` (a C++ compiler and ninja; ~30 s on 2 cores) into
`$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), keyed by the source, torch and Python
versions; `make setup` builds it (`python -m lightning_rlhf.models.fast`), else the first use
does. The environment variable LIGHTNING_RLHF_NATIVE chooses:
- unset or "auto": used when it builds or is built; if the build fails, one warning and the Python twin;
- "0": never (the Python twin);
- "1": required (a failed build raises).
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "native" / "fused_layers.cpp"
ENV = "LIGHTNING_RLHF_NATIVE"
CFLAGS = ["-O3"]
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


def load(verbose: bool = False):
    """Build (once) and import the extension. Raises what the build raises."""
    from torch.utils.cpp_extension import load as cpp_load

    directory = build_directory()
    if not any(directory.glob("*.so")):
        print(f"lightning-rlhf: building the C++ fused layers once into {directory} (~30 s)", file=sys.stderr,
              flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_load(directory.name, [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(directory),
                    verbose=verbose)


def extension():
    """The compiled module, or None where LIGHTNING_RLHF_NATIVE=0 or (auto) it does not build."""
    global _extension
    choice = mode()
    if choice == "0":
        return None
    if _extension is _UNSET:
        try:
            _extension = load()
        except Exception as err:  # noqa: BLE001: no compiler, no ninja, a failed build: the Python twin runs
            if choice == "1":
                raise RuntimeError(f"{ENV}=1 but the C++ fused layers did not build: {err}") from err
            warnings.warn(f"lightning-rlhf: the C++ fused layers did not build ({type(err).__name__}: {err}); "
                          f"using the Python twin (set {ENV}=0 to skip the attempt)", stacklevel=2)
            _extension = None
    if _extension is None and choice == "1":
        raise RuntimeError(f"{ENV}=1 but the C++ fused layers are unavailable in this process")
    return _extension
