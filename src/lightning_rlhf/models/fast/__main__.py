"""`python -m lightning_rlhf.models.fast` (run by `make setup`): build the C++ fast path now, not at the first run.

Never fails the set-up: without a compiler the Python twin runs, and this says so.
"""

import sys

from lightning_rlhf.models.fast import native

try:
    ext = native.extension()
except Exception as err:  # noqa: BLE001: LIGHTNING_RLHF_NATIVE=1 without a build, or a bad value
    print(f"lightning-rlhf: the C++ fast path is unavailable ({err}); the Python twin will run", file=sys.stderr)
    sys.exit(0)
if ext is not None:
    print("lightning-rlhf: the C++ fused layers are ready")
elif native.mode() == "0":
    print(f"lightning-rlhf: the C++ fused layers are off ({native.ENV}=0)")
else:
    print("lightning-rlhf: the C++ fused layers did not build (the warning above says why); the Python twin will run")
