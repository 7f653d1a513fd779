"""Run-time environment: device resolution, seeding, bf16 autocast, and RNG state capture for checkpoints.

docs/conventions.md §6-§7: one `--seed` seeds Python, NumPy and torch; the device and precision are resolved once in
the command and passed down; nothing is decided at import time and nothing writes `CUDA_VISIBLE_DEVICES`.
`World` is the process group when `torchrun` started us (RANK / WORLD_SIZE / LOCAL_RANK in the environment).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from titans_cli.engine.errors import UsageError


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


@dataclass(frozen=True)
class World:
    """This process's place among `torchrun`'s workers; one process (rank 0 of 1) without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The `World` torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; a single process otherwise."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    return World(rank=rank, size=size, local_rank=local)


def device_for(name: str, world: World) -> torch.device:
    """`resolve_device`, with each torchrun worker on its own GPU (cuda:LOCAL_RANK) when the name has no index."""
    device = resolve_device(name)
    if world.distributed and device.type == "cuda" and device.index is None:
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun worker {world.local_rank}: only {torch.cuda.device_count()} CUDA device(s) here; "
                "lower --nproc_per_node"
            )
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world.distributed and device.type == "mps":
        raise UsageError("torchrun: mps has no collective backend; use --device cpu")
    return device


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (NCCL on GPUs, gloo on the CPU); nothing for one process."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_mean(value: float, world: World, device: torch.device) -> float:
    """The mean of `value` over all workers (itself for one process)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def any_worker(flag: bool, world: World, device: torch.device) -> bool:
    """True on every worker if `flag` is true on any (so all stop at the same step)."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every worker (e.g. the validation metrics only rank 0 computed)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    """Wait until every worker gets here."""
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
