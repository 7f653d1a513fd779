"""Benchmark the neural-memory layer: forward+backward tokens/s and peak RSS, one JSON line per configuration.

Each configuration runs in its own subprocess so that peak RSS (ru_maxrss) belongs to that configuration alone.
Configuration: batch 4, dim 256, 4 heads x 64, chunk 64, memory depth 2 (hidden 256), float32,
2 threads; sequence 1024, 4096, 16384. Compared in the same run: our chunked path (`torch`), the per-token
reference (`naive`, short lengths only), titans-pytorch's `NeuralMemory` when installed (`pip install -e .[bench]`),
and options bf16 autocast, torch.compile of the chunk step and, at the longer lengths, activation checkpointing
every `--checkpoint-chunks` chunks. Also inference-only streaming of 1M tokens.

Against the machine's own limit: the run measures its matmul peak (a 2,048² fp32 matmul and a 1,024² bf16 one, at
the same thread count) before, between and after the rows and takes the best (row `impl: "peak"`, printed first);
it counts each row's FLOPs (matmuls, by torch's dispatch-level `FlopCounterMode`, forward + backward) and prints
`gflop_per_s` and `fraction_of_peak` (of the fp32 peak, or of the bf16 peak for bf16 rows). Rows are printed at the
end of the run. The machine changes between sessions: compare fractions and ratios from one run only.

titans-pytorch runs in two settings, labelled by `setting`: `parallel` is its default (every chunk's gradient taken
at the weights the call started with, chunks in parallel); `per-chunk` sets its `batch_size` to the chunk size, so
the gradient point is refreshed at every chunk, the algorithm our layer computes (docs/performance.md §2).

    python bench/memory.py                      # the full table
    python bench/memory.py --quick              # 1024 only, fewer repeats
    python bench/memory.py --only torch --seq 4096
    python bench/memory.py --profile --seq 1024   # where one training step's time goes (JSON lines)

`--profile` runs one forward+backward of our layer under torch.profiler and prints the time per operator class
(matmul kernels vs elementwise and the rest), the achieved GFLOP/s inside the matmul kernels, and the throughput
of the layer's own GEMM shapes measured alone (`shape_bench`): what the small per-chunk matmuls can reach on this
machine, against the 2,048² peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402


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

    # `batch_size` = chunk refreshes the gradient point per chunk (our algorithm); None is its parallel default.
    # Per chunk, its default step bound (max lr 1.0) diverges on these inputs (|y| 2e6 at 512 tokens, NaN by 1,024;
    # docs/results.md), and non-finite arithmetic runs at another speed, so that row bounds the step at 0.1
    # (`max_lr` in the row): same FLOPs, finite outputs.
    batch_size = cfg["chunk"] if cfg.get("setting") == "per-chunk" else None
    mem = NeuralMemory(
        dim=cfg["dim"], chunk_size=cfg["chunk"], heads=cfg["heads"], dim_head=cfg["dim"] // cfg["heads"],
        batch_size=batch_size, default_step_transform_max_lr=cfg.get("max_lr", 1.0),
        default_model_kwargs=dict(depth=cfg["depth"], expansion_factor=float(cfg["expansion"])),
    )  # fmt: skip
    return mem, torch


def run_peak(cfg: dict) -> dict:
    """The machine's matmul throughput at this thread count: best of `repeats` square matmuls per dtype (GFLOP/s)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    row = dict(cfg)
    # bf16 at 1,024²: without bf16 matrix units (AVX2-only CPUs) it is far slower than fp32; 2,048² took minutes.
    for dtype, n in (("fp32", 2048), ("bf16", 1024)):
        a = torch.randn(n, n).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
        b = torch.randn(n, n).to(a.dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        row[f"{dtype}_gflop_per_s"] = round(2 * n**3 / best / 1e9, 1)
    return row


# The GEMM shapes of one chunk step at the benchmark configuration (batch 4 x 4 heads, chunk 64, head dim 64,
# hidden 256): [batch, m, k] @ [batch, k, n]. Reads h W (64x64 @ 64x256, 64x256 @ 256x64), dual-form h Aᵀ
# (64x256 @ 256x64), chunk-end Aᵀ Δ (256x64 @ 64x64).
GEMM_SHAPES = ((16, 64, 64, 256), (16, 64, 256, 64), (16, 256, 64, 64), (16, 64, 64, 64))


def run_profile(cfg: dict) -> dict:
    """One training step of our layer under torch.profiler: self CPU time per operator class, and the matmul
    kernels' achieved GFLOP/s; plus each GEMM shape of a chunk step timed alone."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    mem, _ = _ours(cfg | {"impl": "torch"})
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["dim"], requires_grad=True)

    def step():
        mem(x)[0].square().mean().backward()

    step()
    gflop = count_gflop(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    matmul_ops = (
        "aten::mm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::baddbmm_",
        "aten::addmm",
        "aten::addbmm",
        "aten::_convolution",
    )
    by_op: dict[str, float] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(by_op.values())
    matmul = sum(v for k, v in by_op.items() if k in matmul_ops)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    shapes = {}
    for b, m, k, n in GEMM_SHAPES:
        a, c = torch.randn(b, m, k), torch.randn(b, k, n)
        best = float("inf")
        for _ in range(50):
            t0 = time.perf_counter()
            torch.bmm(a, c)
            best = min(best, time.perf_counter() - t0)
        shapes[f"{b}x{m}x{k}@{k}x{n}"] = round(2 * b * m * k * n / best / 1e9, 1)
    return {**cfg, "impl": "profile", "gflop": round(gflop, 2), "profiled_s": round(total, 3),
            "matmul_s": round(matmul, 3), "matmul_share": round(matmul / total, 3),
            "matmul_gflop_per_s": round(gflop / matmul, 1), "shape_bench_gflop_per_s": shapes,
            "top_ops_s": {k: round(v, 3) for k, v in top}}  # fmt: skip


def _matmul_flops(name: str, args: tuple) -> int:
    """FLOPs of one dispatched aten op (2 per multiply-add); 0 for anything that is not a matmul or convolution."""
    import math

    if name in ("mm", "bmm"):
        a, b = args[0], args[1]
    elif name in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_"):
        a, b = args[1], args[2]
    elif name == "convolution":  # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        x, w, stride, padding, dilation = args[0], args[1], args[3], args[4], args[5]
        kernel = w.shape[2:]
        out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation, strict=True)]  # fmt: skip
        # weight [C_out, C_in / groups, *kernel]: each output element is C_in / groups x kernel multiply-adds
        return 2 * x.shape[0] * w.shape[0] * math.prod(out) * w.shape[1] * math.prod(kernel)
    elif name == "convolution_backward":  # grad_out, input, weight, ..., output_mask: grad input and grad weight
        go, w, mask = args[0], args[2], args[10]
        return 2 * go.numel() * w.shape[1] * math.prod(w.shape[2:]) * (int(mask[0]) + int(mask[1]))
    else:
        return 0
    batch = math.prod(a.shape[:-2])
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def count_gflop(step) -> float:
    """FLOPs of one call of `step` (matmuls and convolutions, forward + backward), in GFLOP, counted per dispatched
    aten op. torch's own FlopCounterMode was not used: it skips the in-place `baddbmm_` (a third of our FLOPs) and
    counts a depthwise convolution as a dense one (19 phantom GFLOP per step here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.flops += _matmul_flops(func._overloadpacket.__name__, args)
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.flops / 1e9


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
        gflop = count_gflop(step)  # an extra call after the timed ones, so that counting never enters a time
    if not torch.isfinite(y.float()).all():
        raise SystemExit(f"non-finite outputs for {cfg}")
    best = min(times)
    return {**cfg, "tokens_per_s": round(B * T / best, 1), "seconds": round(best, 4),
            "gflop": round(gflop, 2), "gflop_per_s": round(gflop / best, 1),
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
    ap.add_argument(
        "--checkpoint-chunks",
        type=int,
        default=8,
        help="also run the longer lengths with activation checkpointing every N chunks (0: skip)",
    )
    ap.add_argument("--profile", action="store_true", help="only profile one training step of our layer per --seq")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        runner = {"stream": run_stream, "peak": run_peak, "profile": run_profile}.get(cfg["impl"], run_one)
        print(json.dumps(runner(cfg)))
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
    if args.profile:
        only = set()
        configs = [base | dict(impl="profile", seq=T) for T in seqs]
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
            configs.append(base | dict(impl="titans-pytorch", seq=T, setting="parallel"))
            configs.append(base | dict(impl="titans-pytorch", seq=T, setting="per-chunk", max_lr=0.1))
        if "naive" in only and T == seqs[0]:
            configs.append(base | dict(impl="naive", seq=256, repeats=1))
    if "stream" in only:
        configs.append(base | dict(impl="stream", mode="inference", batch=1, seq=1_048_576, piece=4096))
    if "titans-pytorch" in only and not have_tp:
        print(json.dumps({"impl": "titans-pytorch", "skipped": "not installed: pip install -e .[bench]"}))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    allocator = os.environ.get("LD_PRELOAD") or "glibc malloc"
    # The matmul peak of a shared VM moves by ±20% from one second to the next (measured: 96-145 GFLOP/s for the
    # same 2,048² fp32 matmul within minutes), so it is measured before, between and after the rows, and every
    # fraction is taken of the best of all those measurements: the machine's limit, not one unlucky sample. Rows are
    # printed at the end, when that best is known; the peak rows come first.
    peaks, rows = [], []
    peak_cfg = dict(impl="peak", threads=args.threads, repeats=10)
    for cfg in [peak_cfg, *(c for one in configs for c in (one, peak_cfg))]:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            rows.append({**cfg, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(allocator=allocator, cpu=cpu_name())
        (peaks if cfg["impl"] == "peak" else rows).append(row)
    best = {k: max(p[f"{k}_gflop_per_s"] for p in peaks) for k in ("fp32", "bf16")} if peaks else {}
    print(json.dumps({"impl": "peak", "threads": args.threads, "measurements": len(peaks),
                      **{f"{k}_gflop_per_s": v for k, v in best.items()},
                      "fp32_gflop_per_s_all": [p["fp32_gflop_per_s"] for p in peaks],
                      "allocator": allocator, "cpu": cpu_name()}))  # fmt: skip
    for row in rows:
        if row.get("impl") == "profile" and "error" not in row:
            row["matmul_fraction_of_peak"] = round(row["matmul_gflop_per_s"] / best["fp32"], 3)
            row["shape_bench_fraction_of_peak"] = {
                k: round(v / best["fp32"], 3) for k, v in row["shape_bench_gflop_per_s"].items()
            }
        elif "gflop_per_s" in row:
            row["fraction_of_peak"] = round(
                row["gflop_per_s"] / best["bf16" if row["precision"] == "bf16" else "fp32"], 3
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
