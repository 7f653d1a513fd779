"""Benchmark: forward+backward tokens/s and peak memory of the memory layer per update path, one JSON line each.

Compares the Triton kernels (`kernel="triton"`: forward and backward kernels), the torch closed form
(`kernel="torch"`) and, when the `bench` extra is installed, titans-pytorch's `NeuralMemory`, all as a whole memory
layer (projections included) at the same configuration. Default (CUDA): batch 4, dim 512,
8 heads × 64, chunk 64, depth 2, bf16 autocast, sequence 4k/16k/64k.

    python bench/kernel.py                     # CUDA, the default configuration
    python bench/kernel.py --tiny              # CPU: Triton's interpreter at a tiny size, so this cannot rot
                                               # (the forward and backward kernels both run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke size; runs Triton in its interpreter")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 4096 16384 65536")
    p.add_argument("--paths", nargs="+", default=["triton", "torch", "titans-pytorch"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--update-only", action="store_true",
                   help="time the memory update alone (q, k, v and gates given), our two paths only")  # fmt: skip
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype of the layer")
    p.add_argument("--repeats", type=int, default=3, help="least timed forward+backward passes after one warm-up")
    p.add_argument("--min-time", type=float, default=1.0, help="keep timing passes until this many seconds passed")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.dim, args.heads, args.chunk = 1, 32, 2, 16
        args.lengths = args.lengths or [40]
        args.repeats, args.min_time = 1, 0.0
        args.dtype = "fp32"
    args.lengths = args.lengths or [4096, 16384, 65536]
    return args


def build_layer(path: str, args: argparse.Namespace, device: Any) -> Callable[[Any], Any]:
    """A function x `[B, T, dim]` → output `[B, T, dim]` for one path (raises ImportError if unavailable)."""
    if path == "titans-pytorch":
        from titans_pytorch import NeuralMemory as ReferenceMemory  # optional `bench` extra

        layer = ReferenceMemory(
            dim=args.dim, chunk_size=args.chunk, heads=args.heads, dim_head=args.dim // args.heads,
            default_model_kwargs=dict(depth=args.depth, expansion_factor=4.0),
        ).to(device)  # fmt: skip
        return lambda x: layer(x)[0]
    from titans_cli.backbone.memory import NeuralMemory

    layer = NeuralMemory(args.dim, args.heads, depth=args.depth, chunk_size=args.chunk, kernel=path)
    layer = layer.to(device)
    return lambda x: layer(x)[0]


def build_update(path: str, args: argparse.Namespace, device: Any) -> Callable[[Any], Any]:
    """The memory update alone: x `[B, T, dim]` gives q, k, v (`[B, H, T, dim/H]`, in the autocast dtype, as the
    layer's projections would) with fixed realistic gates; returns the reads `[B, H, T, dim/H]`."""
    import torch
    import torch.nn.functional as F

    from titans_cli.backbone.ops.memory_update import MemoryState, memory_update

    if path not in ("triton", "torch"):
        raise ValueError("--update-only times our two paths (titans-pytorch has no separate update)")
    H, D = args.heads, args.dim // args.heads
    dims = [D] + [4 * D] * (args.depth - 1) + [D]
    init = [torch.randn(H, dims[i], dims[i + 1], device=device) / dims[i] ** 0.5 for i in range(args.depth)]
    init = [w.requires_grad_() for w in init]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # Gates in the ranges a trained layer uses (slow forgetting, strong momentum, small steps); float32 leaves.
    shape = (args.batch, H, max(args.lengths))
    # (θ up to 0.1 with unit-scale values diverges within a few chunks, and non-finite timings mean nothing.)
    gates = [lo + (hi - lo) * torch.rand(shape, device=device) for lo, hi in ((0.0, 0.01), (0.8, 0.95), (0.0, 0.02))]
    gates = [g.requires_grad_() for g in gates]

    def update(x: Any) -> Any:
        B, T, _ = x.shape
        heads = x.view(B, T, H, D).transpose(1, 2)
        q, k = F.normalize(heads, dim=-1), F.normalize(heads.roll(1, dims=2), dim=-1)
        state = MemoryState.initial(init, B)
        alpha, eta, theta = (g[..., :T] for g in gates)
        y, _ = memory_update(q.to(dtype), k.to(dtype), (0.5 * heads).to(dtype), alpha, eta, theta, state,
                             chunk_size=args.chunk, kernel=path)  # fmt: skip
        return y

    return update


def measure(fn: Callable[[Any], Any], x: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16"):
            y = fn(x)
        if not torch.isfinite(y).all():  # diverged inputs make timings meaningless (docs/performance.md)
            raise FloatingPointError("non-finite output")
        y.float().square().mean().backward()

    warm = time.perf_counter()
    step()  # warm-up: Triton compilation, autotuning of cuBLAS
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - warm
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Each pass ends in a host sync (the finiteness check), so wall-clock time is device time plus launch gaps.
    passes, start = 0, time.perf_counter()
    while passes < args.repeats or time.perf_counter() - start < args.min_time:
        step()
        passes += 1
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {
        "warmup_s": round(warmup_s, 2),  # the first pass: compilation included
        "passes": passes,
        "ms_per_pass": round(1e3 * elapsed / passes, 2),
        "tokens_per_s": round(args.batch * x.shape[1] * passes / elapsed, 1),
    }
    if cuda:
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # process-wide high-water mark, so it only grows over the records of one run
        out["peak_rss_mib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    args = parse_args()
    if args.tiny:
        # Must precede the import of the kernel module (triton.py); a CUDA machine still uses its GPU.
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        name += " (Triton interpreter)"
    torch.manual_seed(0)
    base = {
        "device": name, "batch": args.batch, "dim": args.dim, "heads": args.heads, "chunk": args.chunk,
        "depth": args.depth, "dtype": args.dtype, "torch": torch.__version__,
        "level": "update" if args.update_only else "layer",
    }  # fmt: skip
    if device.type == "cuda":
        import triton

        base["triton"] = triton.__version__
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim, device=device, requires_grad=True)
        for path in args.paths:
            record = {**base, "path": path, "seq": length}
            try:
                build = build_update if args.update_only else build_layer
                record.update(measure(build(path, args, device), x, args, device))
            except ImportError as exc:
                record["skipped"] = f"not installed: {exc}"
            except torch.cuda.OutOfMemoryError:
                record["error"] = "out of memory"
            except Exception as exc:  # a path that cannot run this configuration (e.g. triton without CUDA)
                record["error"] = f"{type(exc).__name__}: {exc}"
            emit(record)
            x.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
