"""Run-time environment: device resolution, seeding, bf16 autocast, and RNG state capture for checkpoints.

Conventions §6-§7: one `--seed` seeds Python, NumPy and torch; the device and precision are resolved once in
the command and passed down; nothing is decided at import time and nothing writes `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from titans_cli.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """Map `auto | cpu | cuda | cuda:N | mps` to a torch device; `auto` picks cuda, then mps, then cpu.

    Raises `UsageError` when the requested device is not available on this machine.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("train.device: 'mps' is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"train.device: {name!r} requested but CUDA is not available; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"train.device: {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise UsageError(f"train.device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed `random`, NumPy and torch (all CUDA devices too); optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Must be set before CUDA initialises its cuBLAS handles (PyTorch "Reproducibility" notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The mixed-precision context for forward passes: bf16 autocast, or nothing for float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "32":
        return contextlib.nullcontext()
    raise UsageError(f"train.precision: expected '32' or 'bf16', got {precision!r}")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors and plain values.

    Checkpoints are loaded with `weights_only=True`, so the NumPy key array travels as a tensor.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when present on both sides)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value: Any) -> Any:
    # random.getstate() is (version, tuple of 625 ints, gauss_next): tuples become lists for the checkpoint.
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing the global RNG streams (e.g. building a model only to load weights)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
