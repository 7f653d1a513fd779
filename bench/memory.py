"""Benchmark the neural-memory layer: forward+backward tokens/s and peak RSS, one JSON line per configuration.

Each configuration runs in its own subprocess so that peak RSS (ru_maxrss) belongs to that configuration alone.
Configuration: batch 4, dim 256, 4 heads x 64, chunk 64, memory depth 2 (hidden 256), float32,
2 threads; sequence 1024, 4096, 16384. Compared in the same run: our chunked path (`torch`), the per-token
reference (`naive`, short lengths only), titans-pytorch's `NeuralMemory` when installed (`pip install -e .[bench]`),
and options bf16 autocast, torch.compile of the chunk step and, at the longer lengths, activation checkpointing
every `--checkpoint-chunks` chunks. Also inference-only streaming of 1M tokens.

    python bench/memory.py                      # the full table
    python bench/memory.py --quick              # 1024 only, fewer repeats
    python bench/memory.py --only torch --seq 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours(cfg: dict):
    import torch

    from titans_cli.backbone.memory import NeuralMemory

    return NeuralMemory(
        cfg["dim"], cfg["heads"], depth=cfg["depth"], expansion=cfg["expansion"], chunk_size=cfg["chunk"],
        kernel=cfg["impl"] if cfg["impl"] in ("torch", "naive") else "torch",
        checkpoint_chunks=cfg.get("checkpoint_chunks", 0),
    ), torch  # fmt: skip


def _titans_pytorch(cfg: dict):
    import torch
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(
        dim=cfg["dim"], chunk_size=cfg["chunk"], heads=cfg["heads"], dim_head=cfg["dim"] // cfg["heads"],
        default_model_kwargs=dict(depth=cfg["depth"], expansion_factor=float(cfg["expansion"])),
    )  # fmt: skip
    return mem, torch


def run_one(cfg: dict) -> dict:
    """Measure one configuration in this process."""
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    if cfg["impl"] == "titans-pytorch":
        mem, _ = _titans_pytorch(cfg)
    else:
        mem, _ = _ours(cfg)
    if cfg.get("compile"):
        import titans_cli.backbone.ops.memory_update as ops
        import titans_cli.backbone.ops.memory_update.naive as naive

        # Experiment only (docs/performance.md): torch.compile the per-chunk step with static shapes, not the chunk
        # loop. Inductor needs a traceable step, so this row runs the plain autograd step (the readable reference
        # naive_chunk_memory_update) compiled in place of the torch kernel.
        naive.naive_chunk_step = torch.compile(naive.naive_chunk_step, dynamic=False)

        def compiled_reference(*args, checkpoint_chunks=0, **kwargs):
            return naive.naive_chunk_memory_update(*args, **kwargs)

        ops.torch_memory_update = compiled_reference
    B, T = cfg["batch"], cfg["seq"]
    # Stable inputs: unit-variance embeddings at the layer's default (learned) gate initialisation.
    x = torch.randn(B, T, cfg["dim"], requires_grad=cfg["mode"] == "train")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16")

    def step():
        with autocast:
            out = mem(x)
        y = out[0] if isinstance(out, tuple) else out
        if cfg["mode"] == "train":
            y.float().square().mean().backward()
        return y

    with torch.set_grad_enabled(cfg["mode"] == "train"):
        t0 = time.perf_counter()
        y = step()  # warm-up (and compilation, when enabled)
        first = time.perf_counter() - t0
        times = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            y = step()
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(y.float()).all():
        raise SystemExit(f"non-finite outputs for {cfg}")
    best = min(times)
    return {**cfg, "tokens_per_s": round(B * T / best, 1), "seconds": round(best, 4),
            "first_call_s": round(first, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}  # fmt: skip


def run_stream(cfg: dict) -> dict:
    """Inference-only streaming of `cfg['seq']` tokens through one LMM layer, `cfg['piece']` tokens at a time."""
    import torch

    from titans_cli.backbone.memory import NeuralMemory

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    mem = NeuralMemory(cfg["dim"], cfg["heads"], depth=cfg["depth"], expansion=cfg["expansion"],
                       chunk_size=cfg["chunk"])  # fmt: skip
    state, rss_marks = None, []
    t0 = time.perf_counter()
    with torch.no_grad():
        done = 0
        while done < cfg["seq"]:
            x = torch.randn(cfg["batch"], cfg["piece"], cfg["dim"])
            y, state = mem(x, state)
            done += cfg["piece"]
            if not torch.isfinite(y).all():
                raise SystemExit(f"non-finite outputs after {done} tokens")
            if done in (cfg["piece"], cfg["seq"] // 2, cfg["seq"]):
                rss_marks.append(round(_peak_rss_mb(), 1))
    dt = time.perf_counter() - t0
    return {**cfg, "tokens_per_s": round(cfg["batch"] * cfg["seq"] / dt, 1), "seconds": round(dt, 2),
            "peak_rss_mb_after_first_piece_half_end": rss_marks, "peak_rss_mb": round(_peak_rss_mb(), 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sequence 1024 only, 2 repeats")
    ap.add_argument("--only", default="", help="comma list of impls: torch,naive,titans-pytorch,stream")
    ap.add_argument("--seq", default="", help="comma list of sequence lengths (default 1024,4096,16384)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-options", action="store_true", help="skip the bf16 and torch.compile rows")
    ap.add_argument("--checkpoint-chunks", type=int, default=8,
                    help="also run the longer lengths with activation checkpointing every N chunks (0: skip)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(run_stream(cfg) if cfg["impl"] == "stream" else run_one(cfg)))
        return

    seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([1024] if args.quick else [1024, 4096, 16384])
    repeats = 2 if args.quick else args.repeats
    base = dict(batch=4, dim=256, heads=4, depth=2, expansion=4, chunk=64, threads=args.threads,
                precision="fp32", mode="train", repeats=repeats, compile=False)  # fmt: skip
    only = set(args.only.split(",")) if args.only else {"torch", "naive", "titans-pytorch", "stream"}
    try:
        import titans_pytorch  # noqa: F401

        have_tp = True
    except ImportError:
        have_tp = False
    configs = []
    for T in seqs:
        if "torch" in only:
            configs.append(base | dict(impl="torch", seq=T))
            if not args.no_options:
                configs.append(base | dict(impl="torch", seq=T, precision="bf16"))
                configs.append(base | dict(impl="torch", seq=T, compile=True))
                configs.append(base | dict(impl="torch", seq=T, precision="bf16", compile=True))
            if args.checkpoint_chunks and T >= 4096:
                configs.append(base | dict(impl="torch", seq=T, checkpoint_chunks=args.checkpoint_chunks))
        if "titans-pytorch" in only and have_tp and T <= 4096:
            configs.append(base | dict(impl="titans-pytorch", seq=T))
        if "naive" in only and T == seqs[0]:
            configs.append(base | dict(impl="naive", seq=256, repeats=1))
    if "stream" in only:
        configs.append(base | dict(impl="stream", mode="inference", batch=1, seq=1_048_576, piece=4096))
    if "titans-pytorch" in only and not have_tp:
        print(json.dumps({"impl": "titans-pytorch", "skipped": "not installed: pip install -e .[bench]"}))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    allocator = os.environ.get("LD_PRELOAD") or "glibc malloc"
    for cfg in configs:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            print(json.dumps({**cfg, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(allocator=allocator, cpu=platform.processor() or platform.machine())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
