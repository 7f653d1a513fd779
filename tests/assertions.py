"""Tensor comparison that names the tensor and reports max-abs and relative-RMS error."""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor


def rel_rms(ref: Tensor, out: Tensor) -> float:
    """‖out − ref‖_RMS / ‖ref‖_RMS in float64 (0/0 counts as 0, x/0 as inf)."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    err = (out64 - ref64).pow(2).mean().sqrt().item()
    scale = ref64.pow(2).mean().sqrt().item()
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def assert_close(name: str, ref: Tensor | None, out: Tensor | None, ratio: float) -> None:
    """Fail with `name: max abs …, rel-RMS … > ratio` unless `out` matches `ref` to relative RMS `ratio`.

    Args:
        name: what is compared, e.g. "dk" or "final surprise, layer 1".
        ref: the reference tensor (None only if `out` is None too, e.g. both gradients unused).
        out: the tensor under test, same shape as `ref`.
        ratio: largest accepted relative RMS error.
    """
    if ref is None or out is None:
        assert ref is None and out is None, (
            f"{name}: one of ref/out is None (ref {ref is None}, out {out is None})"
        )
        return
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0
    rel = rel_rms(ref, out)
    if log := os.environ.get("TITANS_ERROR_LOG"):  # measured errors, e.g. to record a GPU run's margins
        with open(log, "a") as f:
            record = {"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "name": name, "rel_rms": rel,
                      "max_abs": max_abs, "tol": ratio}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    assert rel <= ratio, f"{name}: max abs {max_abs:.1e}, rel-RMS {rel:.1e} > {ratio:.1e}"
