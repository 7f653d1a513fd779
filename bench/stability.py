"""Stability of the memory on adversarial and real inputs: one JSON line per (variant, chunk, input).

Each case builds a small backbone (width 32, 2 layers, 2 heads; every other model field at its default unless
`--set` changes it), trains it for `--steps` AdamW steps on next-token (or next-step) prediction over crops of
the input stream, then streams `--stream` tokens of the same input through the trained model with the carried
state (no gradient) and records the memory's weight norm and the memory layers' output norm over time, once with
the trained gates and once with every gate pinned at its worst case (no forgetting, η and θ at their bounds). A case
is `ok` when the training loss and every recorded norm stay finite and the weight norm stays below `--bound`.

Inputs (vocabulary 16 unless stated): `repeat` (one key repeated 1,000 times, then the next key), `filler` (one
constant token), `scaled` (4 smooth channels ×100, continuous), `random` (uniform tokens), `etth1` (the 7 ETTh1
columns, z-scored on the first 60%), `dna` (the bundled promoter sequences, concatenated, ACGTN).

    python bench/stability.py [--variants lmm,mac,mag,mal] [--chunks 16,64] [--inputs repeat,filler,...]
                              [--steps 300] [--stream 65536] [--long-stream 1000000] [--set model.key=value ...]
                              [--threads 1] [--quick]
    python bench/stability.py --table rows.jsonl ...   # the rows as a Markdown table
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_cli.backbone.memory import NeuralMemory  # noqa: E402
from titans_cli.backbone.model import Titans  # noqa: E402
from titans_cli.engine.config import ModelConfig  # noqa: E402

INPUTS = ("repeat", "filler", "scaled", "random", "etth1", "dna")
CONTINUOUS = {"scaled": 4, "etth1": 7}  # input -> channels; the others are token streams
VOCAB = {"dna": 5}
SCALE = 100.0  # the `scaled` input's amplitude


def make_stream(name: str, n: int, seed: int) -> Tensor:
    """`n` steps of input `name`: int64 `[n]` tokens or float32 `[n, C]` values."""
    rng = np.random.default_rng(seed)
    if name == "repeat":
        keys = rng.integers(0, 16, n // 1000 + 1)
        return torch.from_numpy(np.repeat(keys, 1000)[:n])
    if name == "filler":
        return torch.zeros(n, dtype=torch.long)
    if name == "random":
        return torch.from_numpy(rng.integers(0, 16, n))
    if name == "scaled":
        t = np.arange(n)[:, None]
        periods = np.array([24.0, 50.0, 168.0, 7.0])
        x = np.sin(2 * np.pi * t / periods + rng.uniform(0, 2 * np.pi, 4)) + 0.1 * rng.standard_normal((n, 4))
        return torch.from_numpy(SCALE * x).float()
    if name == "etth1":
        import polars as pl

        x = pl.read_csv(ROOT / "data/ETTh1/ETTh1.csv").drop("date").to_numpy()
        train = x[: int(0.6 * len(x))]
        x = (x - train.mean(0)) / train.std(0)
        return torch.from_numpy(np.resize(x, (n, x.shape[1]))).float()  # np.resize tiles the series
    if name == "dna":
        import polars as pl

        text = "".join(pl.read_csv(ROOT / "data/GUE_prom_300_tata/train.csv")["sequence"].to_list())
        ids = np.frombuffer(text.encode(), dtype=np.uint8)
        table = np.full(256, 4, dtype=np.int64)
        for i, c in enumerate(b"ACGT"):
            table[c] = i
        return torch.from_numpy(np.resize(table[ids], n))
    raise ValueError(f"unknown input {name!r}; expected one of {', '.join(INPUTS)}")


class Probe(nn.Module):
    """Input embedding (tokens) or projection (values) → Titans backbone → next-step head."""

    def __init__(self, cfg: ModelConfig, name: str) -> None:
        super().__init__()
        self.channels = CONTINUOUS.get(name, 0)
        vocab = VOCAB.get(name, 16)
        self.embed = nn.Linear(self.channels, cfg.dim) if self.channels else nn.Embedding(vocab, cfg.dim)
        self.backbone = Titans(cfg)
        self.head = nn.Linear(cfg.dim, self.channels or vocab)

    def forward(self, x: Tensor, state=None):
        h, state = self.backbone(self.embed(x), state)
        return self.head(h), state

    def loss(self, x: Tensor) -> Tensor:
        out, _ = self(x[:, :-1])
        if self.channels:
            target = x[:, 1:] / (SCALE if self.channels == 4 else 1.0)
            return (out - target).pow(2).mean()
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))


def memory_weight_norm(state) -> float:
    """Largest per-(sample, head) Frobenius norm of the memory weights over every layer."""
    worst = 0.0
    for layer in state.layers:
        if layer.memory is None:
            continue
        sq = sum(w.float().pow(2).sum((-2, -1)) for w in layer.memory.weights)
        norm = float(sq.sqrt().max())
        worst = norm if not math.isfinite(norm) else max(worst, norm)  # max() would drop a NaN
    return worst


def run_case(cfg: ModelConfig, name: str, steps: int, stream_len: int, seq: int, batch: int, lr: float,
             seed: int, bound: float) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    model = Probe(cfg, name)
    data = make_stream(name, max(200_000, seq + 1), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        loss = model.loss(x)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    train = {
        "steps": len(losses), "finite": all(math.isfinite(v) for v in losses),
        "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "seconds": round(train_s, 1),
    }  # fmt: skip
    stream = stream_norms(model, name, stream_len, seed + 1, bound) if stream_len else {}
    worst = stream_norms(saturate_gates(model), name, stream_len, seed + 1, bound) if stream_len else {}
    ok = train["finite"] and stream.get("ok", True) and worst.get("ok", True)
    return {"ok": ok, "train": train, "stream": stream, "worst_gates": worst}


@torch.no_grad()
def saturate_gates(model: Probe) -> Probe:
    """The model with every memory's gates pinned at their worst case for stability, whatever the input: no
    forgetting (α → 0), momentum and inner learning rate at their bounds (η → η_max, θ → θ_max)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.gates.weight.zero_()
            m.gates.bias.copy_(torch.tensor([-30.0] * m.heads + [30.0] * m.heads + [30.0] * m.heads))
    return model


@torch.no_grad()
def stream_norms(model: Probe, name: str, n: int, seed: int, bound: float, piece: int = 2048) -> dict:
    """Stream `n` steps through `model` in pieces with the carried state; track weight and output norms."""
    outs: list[float] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(float(o[0].float().pow(2).mean().sqrt())))
             for m in model.modules() if isinstance(m, NeuralMemory)]  # fmt: skip
    model.eval()
    state, w_max, w_last, o_max, done = None, 0.0, 0.0, 0.0, 0
    t0 = time.perf_counter()
    finite = True
    # Up to 200k steps the stream is made once; longer ones piece by piece (same distribution, a seed per piece),
    # so memory stays flat for a 1M-token stream.
    whole = make_stream(name, n, seed) if n <= 200_000 else None
    while done < n:
        size = min(piece, n - done)
        x = whole[done : done + size] if whole is not None else make_stream(name, size, seed + done)
        y, state = model(x.unsqueeze(0), state)
        w_last = memory_weight_norm(state) if bool(torch.isfinite(y).all()) else math.inf
        w_max, o_max = max(w_max, w_last), max([o_max, *outs])
        outs.clear()
        done += len(x)
        if not (math.isfinite(w_last) and math.isfinite(o_max)):
            finite = False
            break
    for h in hooks:
        h.remove()
    ok = finite and w_max < bound
    return {"tokens": done, "finite": finite, "ok": ok, "max_weight_norm": round(w_max, 3),
            "last_weight_norm": round(w_last, 3), "max_out_rms": round(o_max, 3),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """One Markdown row per case: settings, training loss, and the largest weight norm / output RMS streamed."""
    head = ("| variant | chunk | input | settings | ok | train steps | last loss | max ‖M‖ (trained gates) "
            "| max out RMS | max ‖M‖ (worst gates) | tokens |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s, w, t = r["stream"], r["worst_gates"], r["train"]
        sets = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        worst = w.get("max_weight_norm") if w.get("finite") else f"non-finite at {w.get('tokens')}"
        lines.append(f"| {r['variant']} | {r['chunk']} | {r['input']} | {sets} | {'yes' if r['ok'] else '**no**'} "
                     f"| {t['steps']} | {t['last_loss']:.3g} | {s.get('max_weight_norm')} | {s.get('max_out_rms')} "
                     f"| {worst} | {s.get('tokens')} |")  # fmt: skip
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if section != "model" or not field:
            raise SystemExit(f"--set {item!r}: expected model.key=value")
        try:
            out[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[field] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="lmm,mac,mag,mal")
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--inputs", default=",".join(INPUTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stream", type=int, default=65536)
    ap.add_argument("--long-stream", type=int, default=0, help="stream this many tokens for the first variant only")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bound", type=float, default=1e3, help="a weight norm at or above this is not bounded")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 steps, 4k tokens streamed (a smoke run)")
    ap.add_argument("--table", type=Path, nargs="+", help="print the JSON lines of these files as a Markdown table")
    args = ap.parse_args()
    if args.table:
        print(markdown_table([json.loads(line) for path in args.table for line in path.read_text().splitlines()]))
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.stream, args.long_stream = 20, 4096, 0
    sets = parse_sets(args.sets)
    for i, variant in enumerate(args.variants.split(",")):
        for chunk in (int(c) for c in args.chunks.split(",")):
            for name in args.inputs.split(","):
                cfg = ModelConfig(variant=variant, dim=32, n_layers=2, heads=2, chunk_size=chunk, window=32,
                                  segment_len=32, n_persistent=2, ffn_mult=2)  # fmt: skip
                cfg = dataclasses.replace(cfg, **sets)
                stream = args.long_stream if (i == 0 and args.long_stream) else args.stream
                res = run_case(cfg, name, args.steps, stream, args.seq, args.batch, args.lr, args.seed, args.bound)
                row = {"variant": variant, "chunk": chunk, "input": name, "settings": sets, **res}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
