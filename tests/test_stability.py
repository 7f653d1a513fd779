"""The memory with default settings stays finite and bounded on adversarial inputs, trained and untrained.

A run of one repeated key, a constant filler token and inputs scaled ×100 are the cases where a chunked inner
update sums many equal gradients; without a bound on the step the memory overshoots and grows geometrically
(docs/design.md §12). These tests train a tiny model on each for a few hundred steps, then stream a long input
through it, once with the trained gates and once with every gate pinned at its worst case.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from titans_cli.backbone.memory import NeuralMemory
from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig

STEPS, SEQ, BATCH = 200, 64, 2
BOUND = 100.0  # memory weight norm; at initialisation it is ~1-2


def adversarial(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """`[n, 4]` inputs: one key repeated (a new key every 500 steps), a constant vector, or a signal ×100."""
    if kind == "repeat":
        keys = torch.randn(n // 500 + 1, 4, generator=gen)
        return keys.repeat_interleave(500, dim=0)[:n]
    if kind == "filler":
        return torch.ones(n, 4)
    t = torch.arange(n, dtype=torch.float32)[:, None]
    return 100.0 * torch.sin(t / torch.tensor([3.0, 7.0, 24.0, 50.0])) + torch.randn(n, 4, generator=gen)


def weight_norm(state) -> float:
    norms = [sum(w.pow(2).sum((-2, -1)) for w in s.memory.weights).sqrt().max() for s in state.layers]
    return float(torch.stack(norms).max())


@pytest.mark.parametrize("variant", ["lmm", "mag"])
@pytest.mark.parametrize("kind", ["repeat", "filler", "scaled"])
def test_default_memory_trains_and_streams_bounded_on_adversarial_inputs(kind, variant):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(variant=variant, dim=16, n_layers=1, heads=2, window=16, n_persistent=2, ffn_mult=2)
    embed, backbone, head = nn.Linear(4, 16), Titans(cfg), nn.Linear(16, 4)
    params = [*embed.parameters(), *backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    data = adversarial(kind, 20_000, gen)
    scale = data.abs().max().clamp(min=1.0)
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])
        h, _ = backbone(embed(x[:, :-1]))
        loss = (head(h) - x[:, 1:] / scale).pow(2).mean()
        assert math.isfinite(float(loss))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    with torch.no_grad():
        for pinned in (False, True):
            if pinned:  # no forgetting, momentum and inner learning rate at their bounds, for every token
                for m in backbone.modules():
                    if isinstance(m, NeuralMemory):
                        m.gates.weight.zero_()
                        m.gates.bias.copy_(torch.tensor([-30.0] * m.heads + [30.0] * m.heads * 2))
            state = None
            for piece in adversarial(kind, 8192, gen).split(1024):
                h, state = backbone(embed(piece[None]), state)
                assert bool(torch.isfinite(h).all())
            assert weight_norm(state) < BOUND, (pinned, weight_norm(state))
