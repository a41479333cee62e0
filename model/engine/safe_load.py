"""Weights-only loading of every checkpoint file a run reads back.

A `.pt` file is a pickle, and a full unpickle runs whatever code the file names
(`__reduce__` -> `os.system(...)`), so a checkpoint folder from elsewhere must never
be loaded with `weights_only=False`. Everything here loads with
`torch.load(weights_only=True)`: tensors and plain Python data only, plus the few
classes a file of ours or of DeepSpeed 0.19.8 really holds, each named exactly:

- `DEEPSPEED_GLOBALS`: what DeepSpeed 0.19.8 pickles into the checkpoints of our
  configs (ZeRO-0/1/2/3, fp32 and bf16 `torch_autocast`), found by loading real
  ones and reading the refusals: the ZeRO optimiser's loss scaler, the stage enum
  and the fragment addresses of its flat buffers.
- `LEGACY_RNG_GLOBALS`: numpy's uint32 array, for `rank{R}_state.pt` files written
  before the RNG states were stored as tensors (numpy 1.x and 2.x spellings).

DeepSpeed's `engine.load_checkpoint` calls `torch.load(..., weights_only=False)`
itself (`runtime/checkpoint_engine/torch_checkpoint_engine.py`, and directly in a
few ZeRO-3/universal paths); `deepspeed_loads_weights_only()` routes those calls
through `safe_load` for the duration of the load. A refused file raises
`UnsafeCheckpointError` (a `ValueError`: the entries print it as one line and exit 2).
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects a weights-only load refuses (it could run code)."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file cannot be read at all (truncated, empty, not a PyTorch file)."""


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core   # numpy 2 moved numpy.core to numpy._core
    return core.multiarray._reconstruct


# numpy 2 writes `numpy._core.multiarray._reconstruct`, numpy 1.x `numpy.core.multiarray._reconstruct`.
LEGACY_RNG_GLOBALS: list[Any] = [
    (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
    (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),   # numpy.dtypes.UInt32DType: the dtype of the MT19937 key
]


def deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed 0.19.8 pickles into our checkpoints (imported on first use)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


_SKIP = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")


def _refusal_detail(message: str) -> str:
    """The one informative line of torch's multi-line weights-only refusal."""
    for line in message.splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(_SKIP):
            for cut in (" was not an allowed global", " whose module", " Please use"):
                line = line.split(cut)[0]
            return line.rstrip(". ")
    return "refused by the weights-only unpickler"


def safe_load(path: str | Path, allowed: Iterable[Any] = (), map_location: Any = "cpu", *,
              _load=None) -> Any:
    """`torch.load(path, weights_only=True)` with exactly `allowed` extra globals; errors name the file."""
    load = _load or torch.load
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _refusal_detail(str(err))
        if detail.startswith("Unsupported operand") or "Weights only load failed" not in str(err):
            raise UnreadableCheckpointError(f"{path}: unreadable, not a PyTorch file ({detail})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused: not plain weights ({detail}); a pickle like this can run code when loaded, "
            f"so it was not loaded") from None
    except (RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else "file ends early"
        raise UnreadableCheckpointError(f"{path}: unreadable, truncated or not a PyTorch file ({first})") from None


@contextlib.contextmanager
def deepspeed_loads_weights_only():
    """Within the block, every `torch.load` (DeepSpeed's included) is a weights-only load
    that allows `deepspeed_globals()` and nothing else."""
    original = torch.load
    allowed = deepspeed_globals()

    def weights_only_load(f, map_location=None, *args, **kwargs):
        return safe_load(f, allowed, map_location=map_location, _load=original)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def plain(obj: Any) -> Any:
    """`obj` with numpy values turned into Python numbers / tensors, so a weights-only load reads it back."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
