"""Benchmark: forward+backward tokens/s and peak memory of the memory layer per update path, one JSON line each.

Compares the Triton kernels (`kernel="triton"`: forward and backward kernels), the torch closed form
(`kernel="torch"`) and, when the `bench` extra is installed, titans-pytorch's `NeuralMemory`, all as a whole memory
layer (projections included) at the same configuration. Default (CUDA): issue 5's configuration, batch 4, dim 512,
8 heads × 64, chunk 64, depth 2, bf16 autocast, sequence 4k/16k/64k.

    python bench/kernel.py                     # CUDA, the issue's configuration
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
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype of the layer")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes after one warm-up")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.dim, args.heads, args.chunk = 1, 32, 2, 16
        args.lengths = args.lengths or [40]
        args.repeats = 1
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
    from titans_cli.memory import NeuralMemory

    layer = NeuralMemory(args.dim, args.heads, depth=args.depth, chunk_size=args.chunk, kernel=path)
    layer = layer.to(device)
    return lambda x: layer(x)[0]


def measure(fn: Callable[[Any], Any], x: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16"):
            y = fn(x)
        if not torch.isfinite(y).all():  # diverged inputs make timings meaningless (performance.md)
            raise FloatingPointError("non-finite output")
        y.float().square().mean().backward()

    step()  # warm-up: Triton compilation, autotuning of cuBLAS
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": round(args.batch * x.shape[1] * args.repeats / elapsed, 1)}
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    torch.manual_seed(0)
    base = {
        "device": name, "batch": args.batch, "dim": args.dim, "heads": args.heads, "chunk": args.chunk,
        "depth": args.depth, "dtype": args.dtype, "repeats": args.repeats, "torch": torch.__version__,
    }  # fmt: skip
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim, device=device, requires_grad=True)
        for path in args.paths:
            record = {**base, "path": path, "seq": length}
            try:
                record.update(measure(build_layer(path, args, device), x, args, device))
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
