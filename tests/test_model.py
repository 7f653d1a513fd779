"""Titans backbone, every variant: causality, streaming equals one call, batch invariance, gradients everywhere."""

from __future__ import annotations

import pytest
import torch

from titans_cli.backbone.model import Titans
from titans_cli.engine.config import ModelConfig

VARIANTS = ["lmm", "mac", "mag", "mal", "attn"]
# Every variant, plus the alternative readings of ⊗ (memory_residual) and of MAC's write (mac_write).
READINGS = [(v, {}) for v in VARIANTS] + [
    ("mag", {"memory_residual": True}),
    ("mac", {"memory_residual": True, "mac_write": "residual"}),
    ("mac", {"mac_write": "residual"}),
]
READING_IDS = [v + "".join(f"-{k}={w}" for k, w in kw.items()) for v, kw in READINGS]


def _model(variant: str, **kw) -> Titans:
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, dim=16, heads=2, n_layers=2, chunk_size=4, window=6, segment_len=5,
                      n_persistent=2, memory_expansion=2, ffn_mult=2, **kw)  # fmt: skip
    return Titans(cfg).double()


@pytest.mark.parametrize(("variant", "kw"), READINGS, ids=READING_IDS)
def test_outputs_up_to_t_do_not_depend_on_later_tokens(variant, kw):
    model = _model(variant, **kw)
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    y, _ = model(x)
    for t in (0, 7, 15):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2, _ = model(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-12, rtol=1e-12)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-6  # later outputs do see the change


@pytest.mark.parametrize(("variant", "kw"), READINGS, ids=READING_IDS)
def test_streaming_in_pieces_equals_one_call(variant, kw):
    model = _model(variant, **kw)
    x = torch.randn(2, 31, 16, dtype=torch.float64)
    y_full, _ = model(x)
    ys, state = [], None
    for a, b in [(0, 1), (1, 8), (8, 9), (9, 22), (22, 31)]:  # pieces across chunk, segment and window borders
        y, state = model(x[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("variant", VARIANTS)
def test_predictions_do_not_depend_on_batch_composition(variant):
    model = _model(variant)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    y, _ = model(x)
    y1, _ = model(x[1:2])
    torch.testing.assert_close(y[1:2], y1, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("variant", "kw"), READINGS, ids=READING_IDS)
def test_every_parameter_receives_a_gradient(variant, kw):
    model = _model(variant, **kw).float()
    y, _ = model(torch.randn(2, 14, 16))
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize(("variant", "kw"), [("mag", {}), ("mac", {"mac_write": "residual"})])
def test_zero_attn_branch_init_starts_the_hybrid_as_its_memory_alone(variant, kw):
    """attn_branch_init=0 (with memory_residual): the weights carrying attention into the block start at zero, so
    the block's mixer output is its memory output alone, MAC's memory writes RMSNorm(x̂) as LMM's does, and the
    weights still receive a gradient to grow from there."""
    model = _model(variant, memory_residual=True, attn_branch_init=0.0, **kw)
    block = model.blocks[0]
    assert all(w.abs().sum() == 0 for w in block.attn_branch())
    seen = {}
    block.memory.register_forward_hook(lambda mod, inp, out: seen.setdefault("io", []).append((inp[0], out[0])))
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    _, layer = block.start(model.persistent.unsqueeze(0).expand(2, -1, -1), 2)  # the state after the prefix
    seen.clear()
    h = block.norm(x)
    y, _ = block.mix(h, layer)
    torch.testing.assert_close(y, torch.cat([o for _, o in seen["io"]], dim=1), atol=1e-12, rtol=1e-12)
    if variant == "mac":
        written = torch.cat([i for i, _ in seen["io"]], dim=1)
        torch.testing.assert_close(written, block.write_norm(h), atol=1e-12, rtol=1e-12)
    y.square().sum().backward()
    assert block.proj.weight.grad.abs().sum() > 0 or block.attn.out.weight.grad.abs().sum() > 0
    default = _model(variant, memory_residual=True, **kw).blocks[0]
    assert all(w.abs().sum() > 0 for w in default.attn_branch())  # 1.0, the default, keeps PyTorch's init


def test_naive_kernel_gives_the_same_model_outputs():
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y_torch, _ = _model("lmm")(x)
    y_naive, _ = _model("lmm", kernel="naive")(x)
    torch.testing.assert_close(y_naive, y_torch, atol=1e-10, rtol=1e-10)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="model.variant"):
        Titans(ModelConfig(variant="xyz"))  # type: ignore[arg-type]
