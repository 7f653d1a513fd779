"""Triton kernels for the chunked memory update (docs/design.md §3.2-3.3), forward and backward, behind a
`torch.autograd.Function`.

Forward: one program per (batch, head) (depth 1: also per value-column tile) loops over the chunks in order,
carrying the state: per chunk it takes the inner gradients at the chunk-start weights (Eq. 12, closed form), reads
every token by the dual form (docs/design.md §3.3) and writes the chunk-end state (Eqs. 13-14, §3.2). It saves a float32
state checkpoint every `_SEGMENT_TOKENS` tokens.

Backward (`backward="triton"`, the default): one kernel launch, the same programs, walks the checkpoint segments
last to first; per segment it recomputes the chunk-start states from the checkpoint into scratch, then walks the
chunks in reverse carrying the gradient of the chunk-end state: per chunk the backward of the chunk end, of the
dual-form reads layer by layer and of the closed-form inner gradients (σ'' at depth 2), the port of chunk.py's
`_FusedChunkStep._backward`. It writes dq, dk, dv and the gradients of the per-chunk coefficients; torch autograd
maps those to dα, dη, dθ through `layout_coefficients` (O(b²) per chunk). `backward="torch"` keeps the plain
reference: recompute each segment with the torch closed form (`torch_memory_update`) and autograd through it.

The per-chunk coefficients β, γ, E, C, θP come from chunk.py's `chunk_coefficients` (torch), so both paths use the
same numbers. README.md in this folder has the derivation, the tiling and the shape legend.

Shape legend: B batch, H heads, T tokens, D head dim, F memory hidden width, b chunk size, BH = B·H programs,
NC chunks in this call, G chunks per checkpoint segment, NS segments, NVT value-column tiles (depth 1);
BT/BD/BF/BV power-of-two tiles of b, D, F and value columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from titans_cli.backbone.ops.memory_update.chunk import chunk_coefficients, torch_memory_update
from titans_cli.backbone.ops.memory_update.state import MemoryState

# Triton reads TRITON_INTERPRET when the kernels below are decorated; then they run on CPU tensors (tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACTIVATION_IDS = {"silu": 0, "gelu": 1, "tanh": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKWARDS = ("triton", "torch")
_MAX_TILE = 128  # b and D above this would not fit one program's registers/shared memory with this tiling
# Tuning constants, not behaviour switches (tests lower them to exercise several tiles and segments):
_HIDDEN_TILE = 64  # BF, columns of W1 / rows of W2 handled at once (depth 2)
_VALUE_TILE = 64  # BV, value columns per program (depth 1: columns of W are independent)
_SEGMENT_TOKENS = 512  # tokens per backward recompute segment (one fp32 state checkpoint each)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        out = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        out = 1.0 - t * t
    return out


@triton.jit
def _act_grad2(z, ACT: tl.constexpr):
    """σ''(z): the hidden error δ1 = (E2 A2ᵀ) ⊙ σ'(K A1) is differentiated w.r.t. the key pre-activation."""
    if ACT == 0:
        s = tl.sigmoid(z)
        out = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 1:
        out = tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    else:
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        out = -2.0 * t * (1.0 - t * t)
    return out


@triton.jit
def _clamp(err, clip, CLIP: tl.constexpr):
    """Output error δ_L clamped to [−c, c] under the Huber inner loss (`clip` > 0), else unchanged."""
    if CLIP:
        err = tl.minimum(tl.maximum(err, -clip), clip)
    return err


@triton.jit
def _clamp_grad(g, raw, clip, CLIP: tl.constexpr):
    """Gradient through `_clamp`: it passes where |δ_L| ≤ c (as torch's clamp does at the bounds)."""
    if CLIP:
        g = tl.where(tl.abs(raw) <= clip, g, 0.0)
    return g


@triton.jit
def _load_tokens(ptr, c, R, T, D, b, BT: tl.constexpr, BD: tl.constexpr):
    """Rows of chunk c as a `[BT, BD]` fp32 tile; token t = c·b − R + i, rows outside [0, T) read as 0."""
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    t = c * b - R + i
    mask = ((i < b) & (t >= 0) & (t < T))[:, None] & (d < D)[None, :]
    return tl.load(ptr + t[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32), t, mask


@triton.jit
def _load_columns(ptr, t, c, R, T, D, b, col0, BT: tl.constexpr, BV: tl.constexpr):
    """Value columns [col0, col0+BV) of chunk c's rows (t from `_load_tokens`) as a `[BT, BV]` fp32 tile."""
    i = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BV)
    vmask = ((i < b) & (t >= 0) & (t < T))[:, None] & (cols < D)[None, :]
    idx = t[:, None] * D + cols[None, :]
    return tl.load(ptr + idx, mask=vmask, other=0.0).to(tl.float32), idx, vmask


@triton.jit
def _load_coefficients(rb, rg, rc, ec, etp, c, b, BT: tl.constexpr):
    """Read coefficients β̃, γ̃ `[BT]`, C̃ `[BT, BT]`; chunk-end weights C_n,: and θ⊙P_n,: `[BT]`."""
    i = tl.arange(0, BT)
    row = i < b
    vec = c * b + i
    mat = c * b * b + i[:, None] * b + i[None, :]
    return (
        tl.load(rb + vec, mask=row, other=0.0),
        tl.load(rg + vec, mask=row, other=0.0),
        tl.load(rc + mat, mask=row[:, None] & row[None, :], other=0.0),
        tl.load(ec + vec, mask=row, other=0.0),
        tl.load(etp + vec, mask=row, other=0.0),
    )


@triton.jit
def _store_coefficient_grads(grb, grg, grc, geb, geg, gee, gec, getp, c, b, g_rb, g_rg, g_rc, g_be, g_ge, g_ee,
                             g_ce, g_tp, BT: tl.constexpr):  # fmt: skip
    """Gradients of chunk c's coefficients, in `_load_coefficients`' layout (plus the three chunk-end scalars)."""
    i = tl.arange(0, BT)
    row = i < b
    vec = c * b + i
    tl.store(grb + vec, g_rb, mask=row)
    tl.store(grg + vec, g_rg, mask=row)
    tl.store(grc + c * b * b + i[:, None] * b + i[None, :], g_rc, mask=row[:, None] & row[None, :])
    tl.store(gec + vec, g_ce, mask=row)
    tl.store(getp + vec, g_tp, mask=row)
    tl.store(geb + c, g_be)
    tl.store(geg + c, g_ge)
    tl.store(gee + c, g_ee)


# --- depth 1: matrix memory M(k) = k W ---


@triton.jit
def _d1_chunk(c, W, S, A, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, col0, clip,
              BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, CLIP: tl.constexpr, READ: tl.constexpr,
              PREC: tl.constexpr):  # fmt: skip
    """One chunk on value columns [col0, col0+BV): the reads into y (if READ), returns the chunk-end W, S."""
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    V, vidx, vmask = _load_columns(v, t, c, R, T, D, b, col0, BT, BV)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    err = _clamp(tl.dot(K, A, input_precision=PREC) - V, clip, CLIP)  # δ_j = k_j W_anchor − v_j   [BT, BV]
    if READ:
        # Dual-form read (docs/design.md §3.3): q_i W_i = β_i q_i W_0 + γ_i q_i S_0 − Σ_j C_ij (q_i·k_j) δ_j
        qk = r_c * tl.dot(Q, tl.trans(K), input_precision=PREC)
        out = r_beta[:, None] * tl.dot(Q, W, input_precision=PREC) + r_gamma[:, None] * tl.dot(
            Q, S, input_precision=PREC
        )
        out -= tl.dot(qk, err, input_precision=PREC)
        tl.store(y + vidx, out.to(y.dtype.element_ty), mask=vmask)
    # Chunk end (docs/design.md §3.2): W_n = β_n W_0 + γ_n S_0 − Kᵀ diag(C_n,:) Δ, S_n = E_n S_0 − Kᵀ diag(θ⊙P_n,:) Δ
    kt = tl.trans(K)
    W_new = tl.load(eb + c) * W + tl.load(eg + c) * S - tl.dot(kt, c_end[:, None] * err, input_precision=PREC)
    S_new = tl.load(ee + c) * S - tl.dot(kt, tp_end[:, None] * err, input_precision=PREC)
    return W_new, S_new


@triton.jit
def _d1_fwd_kernel(q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, w, s, a0, ck_w, ck_s, a_out,
                   T, R, b, D, NC, G, clip,
                   BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS_ANCHOR: tl.constexpr,
                   SAVE: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Depth 1, program (bh, value tile): W, S `[BD, BV]` stay in registers across all chunks."""
    bh = tl.program_id(0)
    col0 = tl.program_id(1) * BV
    NS = tl.cdiv(NC, G)
    rows = tl.arange(0, BD)
    cols = col0 + tl.arange(0, BV)
    smask = (rows < D)[:, None] & (cols < D)[None, :]
    sidx = rows[:, None] * D + cols[None, :]
    q, k, v, y = q + bh * T * D, k + bh * T * D, v + bh * T * D, y + bh * T * D
    rb, rg, ec, etp = rb + bh * NC * b, rg + bh * NC * b, ec + bh * NC * b, etp + bh * NC * b
    rc = rc + bh * NC * b * b
    eb, eg, ee = eb + bh * NC, eg + bh * NC, ee + bh * NC
    w, s, a0, a_out = w + bh * D * D, s + bh * D * D, a0 + bh * D * D, a_out + bh * D * D
    ck_w, ck_s = ck_w + bh * NS * D * D, ck_s + bh * NS * D * D
    W = tl.load(w + sidx, mask=smask, other=0.0)
    S = tl.load(s + sidx, mask=smask, other=0.0)
    A = W
    if HAS_ANCHOR:  # the call starts inside a chunk: its gradients are taken at the incoming anchor
        A = tl.load(a0 + sidx, mask=smask, other=0.0)
    for c in range(0, NC):
        if c > 0:
            A = W  # a new chunk starts: gradients at its start weights (Eq. 16, t' = chunk start)
        if SAVE:
            if c % G == 0:
                tl.store(ck_w + (c // G) * D * D + sidx, W, mask=smask)
                tl.store(ck_s + (c // G) * D * D + sidx, S, mask=smask)
        if c == NC - 1:
            tl.store(a_out + sidx, A, mask=smask)
        W, S = _d1_chunk(c, W, S, A, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, col0, clip,
                         BT, BD, BV, CLIP, True, PREC)  # fmt: skip
    tl.store(w + sidx, W, mask=smask)
    tl.store(s + sidx, S, mask=smask)


@triton.jit
def _d1_chunk_bwd(c, W, S, A, RW, RS, q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp,
                  dq, dk, dv, grb, grg, grc, geb, geg, gee, gec, getp, T, R, b, D, col0, clip,
                  BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, CLIP: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    """Backward of one depth-1 chunk on value columns [col0, col0+BV).

    W, S: chunk-start state, A: its gradient point, RW, RS: gradients w.r.t. the chunk-end W, S. Stores this
    column tile's share of dq, dk and of the coefficient gradients (summed over tiles by the caller) and its
    columns of dv. Returns the gradients w.r.t. the chunk-start W (without the anchor's), S, and the anchor A.
    """
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    V, vidx, vmask = _load_columns(v, t, c, R, T, D, b, col0, BT, BV)
    GY, _, _ = _load_columns(dy, t, c, R, T, D, b, col0, BT, BV)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    raw = tl.dot(K, A, input_precision=PREC) - V
    err = _clamp(raw, clip, CLIP)
    qk_raw = tl.dot(Q, tl.trans(K), input_precision=PREC)
    qk = r_c * qk_raw
    gyb = r_beta[:, None] * GY
    gyg = r_gamma[:, None] * GY
    # Reads y = β̃ ⊙ Q W + γ̃ ⊙ Q S − (C̃ ⊙ Q Kᵀ) Δ.
    g_rb = tl.sum(GY * tl.dot(Q, W, input_precision=PREC), axis=1)
    g_rg = tl.sum(GY * tl.dot(Q, S, input_precision=PREC), axis=1)
    gm = -tl.dot(GY, tl.trans(err), input_precision=PREC)  # ∂/∂(C̃ ⊙ Q Kᵀ), before the ⊙ C̃
    g_rc = gm * qk_raw
    gm = gm * r_c
    gQ = tl.dot(gyb, tl.trans(W), input_precision=PREC) + tl.dot(gyg, tl.trans(S), input_precision=PREC)
    gQ += tl.dot(gm, K, input_precision=PREC)
    # Chunk end W' = β_n W + γ_n S − Kᵀ (C_n ⊙ Δ), S' = E_n S − Kᵀ (θP ⊙ Δ).
    KR = tl.dot(K, RW, input_precision=PREC)
    KQ = tl.dot(K, RS, input_precision=PREC)
    g_ce = -tl.sum(err * KR, axis=1)
    g_tp = -tl.sum(err * KQ, axis=1)
    g_err = -c_end[:, None] * KR - tp_end[:, None] * KQ - tl.dot(tl.trans(qk), GY, input_precision=PREC)
    gK = tl.dot(tl.trans(gm), Q, input_precision=PREC)
    gK -= tl.dot(c_end[:, None] * err, tl.trans(RW), input_precision=PREC)
    gK -= tl.dot(tp_end[:, None] * err, tl.trans(RS), input_precision=PREC)
    # Inner gradient Δ = K A − V (clamped under the Huber loss).
    g_err = _clamp_grad(g_err, raw, clip, CLIP)
    gK += tl.dot(g_err, tl.trans(A), input_precision=PREC)
    gA = tl.dot(tl.trans(K), g_err, input_precision=PREC)
    tl.store(dq + t[:, None] * D + tl.arange(0, BD)[None, :], gQ, mask=mask)
    tl.store(dk + t[:, None] * D + tl.arange(0, BD)[None, :], gK, mask=mask)
    tl.store(dv + vidx, -g_err, mask=vmask)
    g_be = tl.sum(tl.sum(W * RW, axis=1), axis=0)
    g_ge = tl.sum(tl.sum(S * RW, axis=1), axis=0)
    g_ee = tl.sum(tl.sum(S * RS, axis=1), axis=0)
    _store_coefficient_grads(grb, grg, grc, geb, geg, gee, gec, getp, c, b, g_rb, g_rg, g_rc, g_be, g_ge, g_ee,
                             g_ce, g_tp, BT)  # fmt: skip
    beta_n, gamma_n, e_n = tl.load(eb + c), tl.load(eg + c), tl.load(ee + c)
    dW = beta_n * RW + tl.dot(tl.trans(Q), gyb, input_precision=PREC)
    dS = gamma_n * RW + e_n * RS + tl.dot(tl.trans(Q), gyg, input_precision=PREC)
    return dW, dS, gA


@triton.jit
def _d1_bwd_kernel(q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp, ck_w, ck_s, a0, dw, ds, da, sw, ss,
                   dq, dk, dv, grb, grg, grc, geb, geg, gee, gec, getp, da0,
                   T, R, b, D, NC, G, clip,
                   BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS_ANCHOR: tl.constexpr,
                   HAS_DA: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Depth-1 backward, program (bh, value tile), segments last to first.

    Per segment: recompute the chunk-start W, S of its chunks from the checkpoint into scratch (sw, ss), then walk
    the chunks in reverse carrying dW, dS (gradients w.r.t. the chunk-end state) in registers. dw, ds hold the
    gradients w.r.t. the call's final W, S on entry and w.r.t. its incoming W, S on exit.
    """
    bh = tl.program_id(0)
    vt = tl.program_id(1)
    col0 = vt * BV
    part = vt * tl.num_programs(0) + bh  # this column tile's partial-sum slot for dq, dk and the coefficients
    NS = tl.cdiv(NC, G)
    DD = D * D
    rows = tl.arange(0, BD)
    cols = col0 + tl.arange(0, BV)
    smask = (rows < D)[:, None] & (cols < D)[None, :]
    sidx = rows[:, None] * D + cols[None, :]
    q, k, v, dy, dv = q + bh * T * D, k + bh * T * D, v + bh * T * D, dy + bh * T * D, dv + bh * T * D
    rb, rg, ec, etp = rb + bh * NC * b, rg + bh * NC * b, ec + bh * NC * b, etp + bh * NC * b
    rc = rc + bh * NC * b * b
    eb, eg, ee = eb + bh * NC, eg + bh * NC, ee + bh * NC
    dq, dk = dq + part * T * D, dk + part * T * D
    grb, grg, gec, getp = grb + part * NC * b, grg + part * NC * b, gec + part * NC * b, getp + part * NC * b
    grc = grc + part * NC * b * b
    geb, geg, gee = geb + part * NC, geg + part * NC, gee + part * NC
    ck_w, ck_s = ck_w + bh * NS * DD, ck_s + bh * NS * DD
    sw, ss = sw + bh * G * DD, ss + bh * G * DD
    a0, dw, ds, da, da0 = a0 + bh * DD, dw + bh * DD, ds + bh * DD, da + bh * DD, da0 + bh * DD
    RW = tl.load(dw + sidx, mask=smask, other=0.0)
    RS = tl.load(ds + sidx, mask=smask, other=0.0)
    for r in range(0, NS):
        seg = NS - 1 - r
        C0 = seg * G
        C1 = tl.minimum(C0 + G, NC)
        # Recompute: the chunk-start states of this segment, from its checkpoint (reads skipped).
        W = tl.load(ck_w + seg * DD + sidx, mask=smask, other=0.0)
        S = tl.load(ck_s + seg * DD + sidx, mask=smask, other=0.0)
        for c in range(C0, C1):
            tl.store(sw + (c - C0) * DD + sidx, W, mask=smask)
            tl.store(ss + (c - C0) * DD + sidx, S, mask=smask)
            if c < C1 - 1:
                A = W
                if HAS_ANCHOR:
                    if c == 0:
                        A = tl.load(a0 + sidx, mask=smask, other=0.0)
                W, S = _d1_chunk(c, W, S, A, q, k, v, q, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, col0, clip,
                                 BT, BD, BV, CLIP, False, PREC)  # fmt: skip
        tl.debug_barrier()  # the scratch rows are read back below by other threads
        for j in range(0, C1 - C0):
            c = C1 - 1 - j
            W = tl.load(sw + (c - C0) * DD + sidx, mask=smask, other=0.0)
            S = tl.load(ss + (c - C0) * DD + sidx, mask=smask, other=0.0)
            A = W
            if HAS_ANCHOR:
                if c == 0:
                    A = tl.load(a0 + sidx, mask=smask, other=0.0)
            dW, dS, gA = _d1_chunk_bwd(c, W, S, A, RW, RS, q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp,
                                       dq, dk, dv, grb, grg, grc, geb, geg, gee, gec, getp, T, R, b, D, col0,
                                       clip, BT, BD, BV, CLIP, PREC)  # fmt: skip
            if HAS_DA:
                if c == NC - 1:  # the returned anchor is the last chunk's gradient point
                    gA += tl.load(da + sidx, mask=smask, other=0.0)
            if HAS_ANCHOR:
                if c == 0:  # a call that starts mid-chunk: chunk 0's gradient point is the incoming anchor
                    tl.store(da0 + sidx, gA, mask=smask)
                    gA = gA * 0.0
            RW = dW + gA  # on a chunk border the gradient point is the chunk-start weights themselves
            RS = dS
        tl.debug_barrier()  # the next segment overwrites the scratch
    tl.store(dw + sidx, RW, mask=smask)
    tl.store(ds + sidx, RS, mask=smask)


# --- depth 2: MLP memory M(k) = σ(k W1) W2 ---


@triton.jit
def _d2_copy_state(src1, src2, dst1, dst2, D, F, BD: tl.constexpr, BF: tl.constexpr):
    """Copy a depth-2 state pair (W1 `[D, F]`, W2 `[F, D]`) tile by tile (checkpoints, anchor output)."""
    d = tl.arange(0, BD)
    for j in range(0, tl.cdiv(F, BF)):
        f = j * BF + tl.arange(0, BF)
        m1 = (d < D)[:, None] & (f < F)[None, :]
        i1 = d[:, None] * F + f[None, :]
        tl.store(dst1 + i1, tl.load(src1 + i1, mask=m1), mask=m1)
        m2 = (f < F)[:, None] & (d < D)[None, :]
        i2 = f[:, None] * D + d[None, :]
        tl.store(dst2 + i2, tl.load(src2 + i2, mask=m2), mask=m2)


@triton.jit
def _hidden_tile(j, D, F, BD: tl.constexpr, BF: tl.constexpr):
    """Index and mask of hidden tile j in W1 `[D, F]` (i1, m1) and in W2 `[F, D]` (i2, m2); its units f."""
    d = tl.arange(0, BD)
    f = j * BF + tl.arange(0, BF)
    m1 = (d < D)[:, None] & (f < F)[None, :]
    m2 = (f < F)[:, None] & (d < D)[None, :]
    return d[:, None] * F + f[None, :], m1, f[:, None] * D + d[None, :], m2, f


@triton.jit
def _load_pair(p1, p2, i1, m1, i2, m2):
    """One hidden tile of a depth-2 pair (layer 1 `[D, F]` at p1, layer 2 `[F, D]` at p2), zeros outside."""
    return tl.load(p1 + i1, mask=m1, other=0.0), tl.load(p2 + i2, mask=m2, other=0.0)


@triton.jit
def _d2_error(K, V, a1, a2, D, F, clip, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
              ACT: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Output error at the anchor over all hidden tiles: (σ(K A1) A2 − V, clamped; unclamped)."""
    pred = tl.zeros((BT, BD), dtype=tl.float32)
    for j in range(0, tl.cdiv(F, BF)):
        i1, m1, i2, m2, f = _hidden_tile(j, D, F, BD, BF)
        A1, A2 = _load_pair(a1, a2, i1, m1, i2, m2)
        pred += tl.dot(_act(tl.dot(K, A1, input_precision=PREC), ACT), A2, input_precision=PREC)
    raw = pred - V  # ∂ℓ/∂(a W2) for ½‖M(k) − v‖²   [BT, BD]
    return _clamp(raw, clip, CLIP), raw


@triton.jit
def _d2_chunk(c, a1, a2, w1, w2, s1, s2, o1, o2, os1, os2, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp,
              T, R, b, D, F, clip, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr,
              CLIP: tl.constexpr, READ: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One chunk of the MLP memory: reads into y (if READ); chunk-end state of (w1, w2, s1, s2) into (o1, o2,
    os1, os2), which may be the same fp32 buffers (updated in place)."""
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    V, _, _ = _load_tokens(v, c, R, T, D, b, BT, BD)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    beta_n, gamma_n, e_n = tl.load(eb + c), tl.load(eg + c), tl.load(ee + c)
    # Pass 1 over hidden tiles: the prediction at the anchor, σ(K A1) A2, for the output error E2.
    e2, _ = _d2_error(K, V, a1, a2, D, F, clip, BT, BD, BF, ACT, CLIP, PREC)
    if READ:
        qk = r_c * tl.dot(Q, tl.trans(K), input_precision=PREC)  # C̃ ⊙ Q Kᵀ, the layer-1 dual-form mixing
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    ha = tl.zeros((BT, BT), dtype=tl.float32)  # H̃ Aᵀ, summed over hidden tiles
    # Pass 2 over hidden tiles: layer-1 errors, layer-1 reads (a tile of hidden units is complete on its own),
    # the partial layer-2 read, and the chunk-end state of the tile.
    for j in range(0, tl.cdiv(F, BF)):
        i1, m1, i2, m2, f = _hidden_tile(j, D, F, BD, BF)
        A1, A2 = _load_pair(a1, a2, i1, m1, i2, m2)
        W1, W2 = _load_pair(w1, w2, i1, m1, i2, m2)
        S1, S2 = _load_pair(s1, s2, i1, m1, i2, m2)
        z = tl.dot(K, A1, input_precision=PREC)
        act = _act(z, ACT)
        d1 = tl.dot(e2, tl.trans(A2), input_precision=PREC) * _act_grad(z, ACT)  # δ1 = (E2 A2ᵀ) ⊙ σ'(Z)
        if READ:
            z1 = r_beta[:, None] * tl.dot(Q, W1, input_precision=PREC)
            z1 += r_gamma[:, None] * tl.dot(Q, S1, input_precision=PREC) - tl.dot(qk, d1, input_precision=PREC)
            h1 = _act(z1, ACT)
            acc += r_beta[:, None] * tl.dot(h1, W2, input_precision=PREC)
            acc += r_gamma[:, None] * tl.dot(h1, S2, input_precision=PREC)
            ha += tl.dot(h1, tl.trans(act), input_precision=PREC)
        kt = tl.trans(K)
        at = tl.trans(act)
        W1n = beta_n * W1 + gamma_n * S1 - tl.dot(kt, c_end[:, None] * d1, input_precision=PREC)
        S1n = e_n * S1 - tl.dot(kt, tp_end[:, None] * d1, input_precision=PREC)
        W2n = beta_n * W2 + gamma_n * S2 - tl.dot(at, c_end[:, None] * e2, input_precision=PREC)
        S2n = e_n * S2 - tl.dot(at, tp_end[:, None] * e2, input_precision=PREC)
        # The anchor may alias w1/w2 and the output the state: every thread must have loaded this tile before any
        # thread overwrites it.
        tl.debug_barrier()
        tl.store(o1 + i1, W1n, mask=m1)
        tl.store(os1 + i1, S1n, mask=m1)
        tl.store(o2 + i2, W2n, mask=m2)
        tl.store(os2 + i2, S2n, mask=m2)
    if READ:
        out = acc - tl.dot(r_c * ha, e2, input_precision=PREC)
        tl.store(y + t[:, None] * D + tl.arange(0, BD)[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the next chunk reads the state tiles written above


@triton.jit
def _d2_fwd_kernel(q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, w1, w2, s1, s2, a01, a02,
                   ck_w1, ck_w2, ck_s1, ck_s2, ao1, ao2, T, R, b, D, F, NC, G, clip,
                   BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr,
                   HAS_ANCHOR: tl.constexpr, SAVE: tl.constexpr, CLIP: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    """Depth 2, program bh: the state lives in fp32 global scratch, streamed in hidden tiles per chunk."""
    bh = tl.program_id(0)
    NS = tl.cdiv(NC, G)
    DF = D * F
    q, k, v, y = q + bh * T * D, k + bh * T * D, v + bh * T * D, y + bh * T * D
    rb, rg, ec, etp = rb + bh * NC * b, rg + bh * NC * b, ec + bh * NC * b, etp + bh * NC * b
    rc = rc + bh * NC * b * b
    eb, eg, ee = eb + bh * NC, eg + bh * NC, ee + bh * NC
    w1, w2, s1, s2 = w1 + bh * DF, w2 + bh * DF, s1 + bh * DF, s2 + bh * DF
    ao1, ao2 = ao1 + bh * DF, ao2 + bh * DF
    ck_w1, ck_w2, ck_s1, ck_s2 = ck_w1 + bh * NS * DF, ck_w2 + bh * NS * DF, ck_s1 + bh * NS * DF, ck_s2 + bh * NS * DF
    a01, a02 = a01 + bh * DF, a02 + bh * DF
    for c in range(0, NC):
        p1, p2 = w1, w2  # gradient point of this chunk: its start weights (Eq. 16, t' = chunk start) ...
        if HAS_ANCHOR:
            if c == 0:  # ... or the incoming anchor when the call starts inside a chunk
                p1, p2 = a01, a02
        if SAVE:
            if c % G == 0:
                g = (c // G) * DF
                _d2_copy_state(w1, w2, ck_w1 + g, ck_w2 + g, D, F, BD, BF)
                _d2_copy_state(s1, s2, ck_s1 + g, ck_s2 + g, D, F, BD, BF)
        if c == NC - 1:
            _d2_copy_state(p1, p2, ao1, ao2, D, F, BD, BF)
        tl.debug_barrier()
        _d2_chunk(c, p1, p2, w1, w2, s1, s2, w1, w2, s1, s2, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp,
                  T, R, b, D, F, clip, BT, BD, BF, ACT, CLIP, True, PREC)  # fmt: skip


@triton.jit
def _d2_chunk_bwd(c, a1, a2, w1, w2, s1, s2, dw1, dw2, ds1, ds2, t1, t2, dao2, da1, da2, gxs, gps,
                  q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp, dq, dk, dv, grb, grg, grc, geb, geg, gee, gec, getp,
                  T, R, b, D, F, NC, clip, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                  ACT: tl.constexpr, HAS_ANCHOR: tl.constexpr, HAS_DA: tl.constexpr, CLIP: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    """Backward of one depth-2 chunk (README.md, "Triton backward").

    a1, a2: gradient point; w1, w2, s1, s2: chunk-start state; dw1, dw2, ds1, ds2: gradients w.r.t. the chunk-end
    state on entry, w.r.t. the chunk-start state on exit (updated in place, tile by tile); t1, t2: where the
    gradient point's gradient goes (dw1, dw2 on a chunk border, else the incoming anchor's); gxs, gps: `[b, F]`
    scratch for ∂/∂σ(K A1) and ∂/∂(K A1) between the hidden passes.
    """
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    V, _, _ = _load_tokens(v, c, R, T, D, b, BT, BD)
    GY, _, _ = _load_tokens(dy, c, R, T, D, b, BT, BD)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    beta_n, gamma_n, e_n = tl.load(eb + c), tl.load(eg + c), tl.load(ee + c)
    i = tl.arange(0, BT)
    NF = tl.cdiv(F, BF)
    # Pass A: the output error E2 at the gradient point (needs every hidden tile).
    e2, raw = _d2_error(K, V, a1, a2, D, F, clip, BT, BD, BF, ACT, CLIP, PREC)
    qk_raw = tl.dot(Q, tl.trans(K), input_precision=PREC)
    qk = r_c * qk_raw
    gm2 = -tl.dot(GY, tl.trans(e2), input_precision=PREC)  # ∂/∂(C̃ ⊙ H1 Xᵀ) of the layer-2 read, before ⊙ C̃
    gm2c = gm2 * r_c
    ha2 = tl.zeros((BT, BT), dtype=tl.float32)  # H1 Xᵀ
    g1 = tl.zeros((BT, BT), dtype=tl.float32)  # ∂/∂(C̃ ⊙ Q Kᵀ) of the layer-1 read, before ⊙ C̃
    gQ = tl.zeros((BT, BD), dtype=tl.float32)
    gK = tl.zeros((BT, BD), dtype=tl.float32)
    ge2 = tl.zeros((BT, BD), dtype=tl.float32)  # ∂/∂E2 (the clamped error)
    xr2 = tl.zeros((BT, BD), dtype=tl.float32)  # X dW2'
    xq2 = tl.zeros((BT, BD), dtype=tl.float32)  # X dS2'
    g_rb = tl.zeros((BT,), dtype=tl.float32)
    g_rg = tl.zeros((BT,), dtype=tl.float32)
    g_ce = tl.zeros((BT,), dtype=tl.float32)
    g_tp = tl.zeros((BT,), dtype=tl.float32)
    g_be = tl.zeros((BD,), dtype=tl.float32)
    g_ge = tl.zeros((BD,), dtype=tl.float32)
    g_ee = tl.zeros((BD,), dtype=tl.float32)
    # Pass B over hidden tiles: everything that is complete per tile (the layer-1 read, the hidden errors, the
    # tile's state gradients); gradients that need every tile (∂E2, ∂X) are finished in pass C.
    for j in range(0, NF):
        i1, m1, i2, m2, f = _hidden_tile(j, D, F, BD, BF)
        A1, A2 = _load_pair(a1, a2, i1, m1, i2, m2)
        W1, W2 = _load_pair(w1, w2, i1, m1, i2, m2)
        S1, S2 = _load_pair(s1, s2, i1, m1, i2, m2)
        R1, R2 = _load_pair(dw1, dw2, i1, m1, i2, m2)  # gradients w.r.t. the chunk-end state
        Q1, Q2 = _load_pair(ds1, ds2, i1, m1, i2, m2)
        p = tl.dot(K, A1, input_precision=PREC)  # key pre-activation P
        x = _act(p, ACT)  # X = σ(P), the layer-2 input
        sp = _act_grad(p, ACT)
        t1v = tl.dot(e2, tl.trans(A2), input_precision=PREC)  # E2 A2ᵀ
        e1 = t1v * sp  # δ1
        # Forward of the reads, tile-complete: Z1 = β̃ Q W1 + γ̃ Q S1 − (C̃ ⊙ Q Kᵀ) E1, H1 = σ(Z1).
        hw1 = tl.dot(Q, W1, input_precision=PREC)
        hs1 = tl.dot(Q, S1, input_precision=PREC)
        z1 = r_beta[:, None] * hw1 + r_gamma[:, None] * hs1 - tl.dot(qk, e1, input_precision=PREC)
        h1 = _act(z1, ACT)
        ha2 += tl.dot(h1, tl.trans(x), input_precision=PREC)
        # Layer-2 read y = β̃ H1 W2 + γ̃ H1 S2 − (C̃ ⊙ H1 Xᵀ) E2.
        gyw2 = tl.dot(GY, tl.trans(W2), input_precision=PREC)
        gys2 = tl.dot(GY, tl.trans(S2), input_precision=PREC)
        g_rb += tl.sum(h1 * gyw2, axis=1)
        g_rg += tl.sum(h1 * gys2, axis=1)
        gh1 = r_beta[:, None] * gyw2 + r_gamma[:, None] * gys2 + tl.dot(gm2c, x, input_precision=PREC)
        gx = tl.dot(tl.trans(gm2c), h1, input_precision=PREC)
        # Chunk end of layer 2: W2' = β_n W2 + γ_n S2 − Xᵀ (C_n ⊙ E2), S2' = E_n S2 − Xᵀ (θP ⊙ E2).
        # (Row scalings go on the products, so that the loop-invariant e2 is the only shared-memory operand.)
        gx -= c_end[:, None] * tl.dot(e2, tl.trans(R2), input_precision=PREC)
        gx -= tp_end[:, None] * tl.dot(e2, tl.trans(Q2), input_precision=PREC)
        xr2 += tl.dot(x, R2, input_precision=PREC)
        xq2 += tl.dot(x, Q2, input_precision=PREC)
        # Layer-1 read.
        gz1 = gh1 * _act_grad(z1, ACT)
        g_rb += tl.sum(gz1 * hw1, axis=1)
        g_rg += tl.sum(gz1 * hs1, axis=1)
        g1 -= tl.dot(gz1, tl.trans(e1), input_precision=PREC)
        gzb = r_beta[:, None] * gz1
        gzg = r_gamma[:, None] * gz1
        gQ += tl.dot(gzb, tl.trans(W1), input_precision=PREC) + tl.dot(gzg, tl.trans(S1), input_precision=PREC)
        # Chunk end of layer 1: W1' = β_n W1 + γ_n S1 − Kᵀ (C_n ⊙ E1), S1' = E_n S1 − Kᵀ (θP ⊙ E1).
        kr1 = tl.dot(K, R1, input_precision=PREC)
        kq1 = tl.dot(K, Q1, input_precision=PREC)
        g_ce -= tl.sum(e1 * kr1, axis=1)
        g_tp -= tl.sum(e1 * kq1, axis=1)
        gK -= c_end[:, None] * tl.dot(e1, tl.trans(R1), input_precision=PREC)
        gK -= tp_end[:, None] * tl.dot(e1, tl.trans(Q1), input_precision=PREC)
        ge1 = -c_end[:, None] * kr1 - tp_end[:, None] * kq1 - tl.dot(tl.trans(qk), gz1, input_precision=PREC)
        # Hidden error E1 = (E2 A2ᵀ) ⊙ σ'(P): σ'' enters here.
        gt1 = ge1 * sp
        gp = ge1 * t1v * _act_grad2(p, ACT)
        ge2 += tl.dot(gt1, A2, input_precision=PREC)
        ga2 = tl.dot(tl.trans(gt1), e2, input_precision=PREC)  # part of ∂A2; the rest (Xᵀ ∂pred) in pass C
        g_be += tl.sum(W1 * R1, axis=1) + tl.sum(W2 * R2, axis=0)
        g_ge += tl.sum(S1 * R1, axis=1) + tl.sum(S2 * R2, axis=0)
        g_ee += tl.sum(S1 * Q1, axis=1) + tl.sum(S2 * Q2, axis=0)
        nW1 = beta_n * R1 + tl.dot(tl.trans(Q), gzb, input_precision=PREC)
        nS1 = gamma_n * R1 + e_n * Q1 + tl.dot(tl.trans(Q), gzg, input_precision=PREC)
        nW2 = beta_n * R2 + tl.dot(tl.trans(r_beta[:, None] * h1), GY, input_precision=PREC)
        nS2 = gamma_n * R2 + e_n * Q2 + tl.dot(tl.trans(r_gamma[:, None] * h1), GY, input_precision=PREC)
        if HAS_ANCHOR:
            if c == 0:  # chunk 0 of a call that starts mid-chunk: the gradient point is the incoming anchor
                tl.store(dao2 + i2, ga2, mask=m2)
                ga2 = ga2 * 0.0
        nW2 += ga2
        gmask = (i < b)[:, None] & (f < F)[None, :]
        gidx = i[:, None] * F + f[None, :]
        tl.debug_barrier()  # every thread has read this tile of dW, dS before any thread overwrites it
        tl.store(dw1 + i1, nW1, mask=m1)
        tl.store(ds1 + i1, nS1, mask=m1)
        tl.store(dw2 + i2, nW2, mask=m2)
        tl.store(ds2 + i2, nS2, mask=m2)
        tl.store(gxs + gidx, gx, mask=gmask)
        tl.store(gps + gidx, gp, mask=gmask)
    # Terms of ∂E2 that sum over every hidden tile: the chunk end and the read's (C̃ ⊙ H1 Xᵀ)ᵀ ∂y.
    ge2 += -c_end[:, None] * xr2 - tp_end[:, None] * xq2 - tl.dot(tl.trans(r_c * ha2), GY, input_precision=PREC)
    g_ce -= tl.sum(e2 * xr2, axis=1)
    g_tp -= tl.sum(e2 * xq2, axis=1)
    g_rc = gm2 * ha2 + g1 * qk_raw
    gm1 = g1 * r_c
    gQ += tl.dot(gm1, K, input_precision=PREC)
    gK += tl.dot(tl.trans(gm1), Q, input_precision=PREC)
    gpred = _clamp_grad(ge2, raw, clip, CLIP)  # ∂/∂(σ(K A1) A2): E2 = clamp(pred − V)
    tl.store(dv + t[:, None] * D + tl.arange(0, BD)[None, :], -gpred, mask=mask)
    tl.debug_barrier()  # pass C reads the scratch and the state gradients written above
    # Pass C over hidden tiles: ∂X, ∂P and the gradient point's gradient, now that ∂E2 is complete.
    for j in range(0, NF):
        i1, m1, i2, m2, f = _hidden_tile(j, D, F, BD, BF)
        A1, A2 = _load_pair(a1, a2, i1, m1, i2, m2)
        p = tl.dot(K, A1, input_precision=PREC)
        x = _act(p, ACT)
        gmask = (i < b)[:, None] & (f < F)[None, :]
        gidx = i[:, None] * F + f[None, :]
        gx = tl.load(gxs + gidx, mask=gmask, other=0.0) + tl.dot(gpred, tl.trans(A2), input_precision=PREC)
        gp = tl.load(gps + gidx, mask=gmask, other=0.0) + gx * _act_grad(p, ACT)
        gK += tl.dot(gp, tl.trans(A1), input_precision=PREC)
        ga1 = tl.dot(tl.trans(K), gp, input_precision=PREC)
        ga2 = tl.dot(tl.trans(x), gpred, input_precision=PREC)
        if HAS_DA:
            if c == NC - 1:  # the returned anchor is the last chunk's gradient point
                d1, d2 = _load_pair(da1, da2, i1, m1, i2, m2)
                ga1 += d1
                ga2 += d2
        g1_old, g2_old = _load_pair(t1, t2, i1, m1, i2, m2)
        tl.store(t1 + i1, g1_old + ga1, mask=m1)
        tl.store(t2 + i2, g2_old + ga2, mask=m2)
    tl.store(dq + t[:, None] * D + tl.arange(0, BD)[None, :], gQ, mask=mask)
    tl.store(dk + t[:, None] * D + tl.arange(0, BD)[None, :], gK, mask=mask)
    _store_coefficient_grads(grb, grg, grc, geb, geg, gee, gec, getp, c, b, g_rb, g_rg, g_rc, tl.sum(g_be, axis=0),
                             tl.sum(g_ge, axis=0), tl.sum(g_ee, axis=0), g_ce, g_tp, BT)  # fmt: skip
    tl.debug_barrier()  # the previous chunk reads dw, ds and the scratch


@triton.jit
def _d2_bwd_kernel(q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp, ck_w1, ck_w2, ck_s1, ck_s2, a01, a02,
                   dw1, dw2, ds1, ds2, da1, da2, sw1, sw2, ss1, ss2, gxs, gps,
                   dq, dk, dv, grb, grg, grc, geb, geg, gee, gec, getp, dao1, dao2,
                   T, R, b, D, F, NC, G, clip,
                   BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr,
                   HAS_ANCHOR: tl.constexpr, HAS_DA: tl.constexpr, CLIP: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    """Depth-2 backward, program bh, segments last to first: recompute the segment's chunk-start states from its
    checkpoint into scratch slots (sw*, ss*), then `_d2_chunk_bwd` per chunk in reverse. dw*, ds* hold the
    gradients w.r.t. the final state on entry and w.r.t. the incoming state on exit."""
    bh = tl.program_id(0)
    NS = tl.cdiv(NC, G)
    DF = D * F
    q, k, v, dy = q + bh * T * D, k + bh * T * D, v + bh * T * D, dy + bh * T * D
    dq, dk, dv = dq + bh * T * D, dk + bh * T * D, dv + bh * T * D
    rb, rg, ec, etp = rb + bh * NC * b, rg + bh * NC * b, ec + bh * NC * b, etp + bh * NC * b
    grb, grg, gec, getp = grb + bh * NC * b, grg + bh * NC * b, gec + bh * NC * b, getp + bh * NC * b
    rc, grc = rc + bh * NC * b * b, grc + bh * NC * b * b
    eb, eg, ee = eb + bh * NC, eg + bh * NC, ee + bh * NC
    geb, geg, gee = geb + bh * NC, geg + bh * NC, gee + bh * NC
    ck_w1, ck_w2, ck_s1, ck_s2 = ck_w1 + bh * NS * DF, ck_w2 + bh * NS * DF, ck_s1 + bh * NS * DF, ck_s2 + bh * NS * DF
    sw1, sw2, ss1, ss2 = sw1 + bh * G * DF, sw2 + bh * G * DF, ss1 + bh * G * DF, ss2 + bh * G * DF
    a01, a02, da1, da2 = a01 + bh * DF, a02 + bh * DF, da1 + bh * DF, da2 + bh * DF
    dao1, dao2 = dao1 + bh * DF, dao2 + bh * DF
    dw1, dw2, ds1, ds2 = dw1 + bh * DF, dw2 + bh * DF, ds1 + bh * DF, ds2 + bh * DF
    gxs, gps = gxs + bh * b * F, gps + bh * b * F
    for r in range(0, NS):
        seg = NS - 1 - r
        C0 = seg * G
        C1 = tl.minimum(C0 + G, NC)
        # Recompute: slot j holds the start state of chunk C0 + j (writes only, no reads).
        _d2_copy_state(ck_w1 + seg * DF, ck_w2 + seg * DF, sw1, sw2, D, F, BD, BF)
        _d2_copy_state(ck_s1 + seg * DF, ck_s2 + seg * DF, ss1, ss2, D, F, BD, BF)
        tl.debug_barrier()
        for c in range(C0, C1 - 1):
            o = (c - C0) * DF
            p1, p2 = sw1 + o, sw2 + o
            if HAS_ANCHOR:
                if c == 0:
                    p1, p2 = a01, a02
            _d2_chunk(c, p1, p2, sw1 + o, sw2 + o, ss1 + o, ss2 + o, sw1 + o + DF, sw2 + o + DF, ss1 + o + DF,
                      ss2 + o + DF, q, k, v, q, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, F, clip,
                      BT, BD, BF, ACT, CLIP, False, PREC)  # fmt: skip
        for j in range(0, C1 - C0):
            c = C1 - 1 - j
            o = (c - C0) * DF
            p1, p2 = sw1 + o, sw2 + o
            t1, t2 = dw1, dw2  # on a chunk border the gradient point is the chunk-start weights themselves
            if HAS_ANCHOR:
                if c == 0:
                    p1, p2 = a01, a02
                    t1, t2 = dao1, dao2
            _d2_chunk_bwd(c, p1, p2, sw1 + o, sw2 + o, ss1 + o, ss2 + o, dw1, dw2, ds1, ds2, t1, t2, dao2, da1, da2,
                          gxs, gps, q, k, v, dy, rb, rg, rc, eb, eg, ee, ec, etp, dq, dk, dv, grb, grg, grc, geb,
                          geg, gee, gec, getp, T, R, b, D, F, NC, clip, BT, BD, BF, ACT, HAS_ANCHOR, HAS_DA, CLIP,
                          PREC)  # fmt: skip


def layout_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, offset: int, b: int, read: str) -> list[Tensor]:
    """Per-chunk coefficients in the kernel's chunk layout, float32, from gates `[BH, T]`.

    Chunk c holds tokens t = c·b − offset + i in slots i < b. Each chunk's coefficients are exactly the torch
    path's (`chunk_coefficients` on that chunk's own tokens: a partial first or last chunk is a shorter chunk,
    not a padded one); slots without a token get zeros, which the kernels never read into the state. Plain torch,
    so the backward differentiates it with autograd (coefficient gradients from the kernel → dα, dη, dθ).

    Args:
        alpha, eta, theta: `[BH, T]` gates.
        offset: tokens of the first chunk already written by earlier calls (position mod b).
        b: chunk size.
        read: "inclusive" or "strict".
    Returns:
        read β̃, γ̃ `[BH, NC, b]`, C̃ `[BH, NC, b, b]` (inclusive, or shifted one row for the strict read)
        and the chunk-end β_n, γ_n, E_n `[BH, NC]`, C_n,: and θ⊙P_n,: `[BH, NC, b]`.
    """
    BH, T = alpha.shape
    NC = -(-(T + offset) // b)
    vec = alpha.new_zeros(BH, NC, b, dtype=torch.float32)
    r_beta, r_gamma, c_end, tp_end = vec, vec.clone(), vec.clone(), vec.clone()
    r_c = alpha.new_zeros(BH, NC, b, b, dtype=torch.float32)
    b_end, g_end, e_end = (alpha.new_zeros(BH, NC, dtype=torch.float32) for _ in range(3))
    # (chunks, tokens, first slot): the first chunk, the full middle chunks batched, the last chunk.
    first = min(b - offset, T)
    groups = [(slice(0, 1), slice(0, first), offset)]
    if NC > 1:
        last = (NC - 1) * b - offset
        groups += [(slice(1, NC - 1), slice(first, last), 0), (slice(NC - 1, NC), slice(last, T), 0)]
    for chunks, tokens, slot in groups:
        n_chunks = chunks.stop - chunks.start
        if n_chunks == 0:
            continue
        gates = (g[:, tokens].float().reshape(BH, n_chunks, -1) for g in (alpha, eta, theta))
        beta, gamma, e, c, theta_p = chunk_coefficients(*gates)
        n = beta.shape[-1]
        if read == "inclusive":
            rb, rg, rc = beta, gamma, c
        else:  # strict read y_i = M_{i−1}(q_i): the previous row, row 0 being the chunk-start state
            rb = torch.cat([torch.ones_like(beta[..., :1]), beta[..., :-1]], dim=-1)
            rg = torch.cat([torch.zeros_like(gamma[..., :1]), gamma[..., :-1]], dim=-1)
            rc = torch.cat([torch.zeros_like(c[..., :1, :]), c[..., :-1, :]], dim=-2)
        slots = slice(slot, slot + n)
        r_beta[:, chunks, slots], r_gamma[:, chunks, slots], r_c[:, chunks, slots, slots] = rb, rg, rc
        b_end[:, chunks], g_end[:, chunks], e_end[:, chunks] = beta[..., -1], gamma[..., -1], e[..., -1]
        c_end[:, chunks, slots], tp_end[:, chunks, slots] = c[..., -1, :], theta_p
    return [r_beta, r_gamma, r_c, b_end, g_end, e_end, c_end, tp_end]


def unsupported_reason(
    q: Tensor, k: Tensor, v: Tensor, state: MemoryState, chunk_size: int, activation: str, read: str
) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    if not (q.is_cuda or (INTERPRET and q.device.type == "cpu")):
        return f"it needs CUDA tensors (got {q.device.type}; the CPU runs it only under TRITON_INTERPRET=1)"
    depth = len(state.weights)
    if depth not in (1, 2):
        return f"it supports memory depth 1 or 2 (got {depth})"
    if activation not in _ACTIVATION_IDS:
        return f"activation {activation!r} has no kernel (supported: {', '.join(_ACTIVATION_IDS)})"
    if read not in ("inclusive", "strict"):
        return f"read {read!r} is not 'inclusive' or 'strict'"
    if q.dtype not in _DTYPES:
        return f"inputs are {q.dtype}; it takes float32, bfloat16 or float16 (float32 accumulation)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype}); cast them to one"
    D = q.shape[-1]
    if D > _MAX_TILE or chunk_size > _MAX_TILE:
        return f"head dim {D} and chunk size {chunk_size} must be ≤ {_MAX_TILE}"
    shapes = [tuple(w.shape[-2:]) for w in state.weights]
    if shapes[0][0] != D or shapes[-1][-1] != D:
        return f"memory weights {shapes} do not map head dim {D} to {D}"
    return None


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every tile dimension ≥ 16


def _flat(t: Tensor) -> Tensor:
    """`[B, H, ...]` → contiguous float32 `[B·H, ...]`, a fresh buffer the kernel may write in place."""
    return t.to(torch.float32).reshape(-1, *t.shape[2:]).clone(memory_format=torch.contiguous_format)


def _flat_or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    """An incoming gradient as a fresh float32 `[B·H, ...]` buffer, zeros when autograd passed None."""
    return torch.zeros_like(like) if g is None else _flat(g)


@dataclass(frozen=True)
class _Spec:
    depth: int
    position: int
    chunk_size: int
    activation: str
    read: str
    clip: float = 0.0
    backward: str = "triton"


class _TritonMemoryUpdate(torch.autograd.Function):
    """Inputs q, k, v, α, η, θ, then W, S, anchor per layer; outputs y, then W, S, anchor per layer."""

    @staticmethod
    def forward(ctx, spec: _Spec, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                *state: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
        B, H, T, D = q.shape
        L, b = spec.depth, spec.chunk_size
        R = spec.position % b
        NC = -(-(T + R) // b)
        G = max(1, min(_SEGMENT_TOKENS // b, NC))
        NS = -(-NC // G)
        save = any(ctx.needs_input_grad)
        gates = (t.reshape(B * H, T) for t in (alpha, eta, theta))
        # Under bf16 autocast the O(b²) coefficient matmuls would drop to bf16; keep them float32 (docs/design.md §3.2).
        with torch.autocast(q.device.type, enabled=False):
            coefs = layout_coefficients(*gates, R, b, spec.read)
        qf, kf, vf = (t.reshape(B * H, T, D).contiguous() for t in (q, k, v))
        y = torch.empty_like(qf)
        w = [_flat(t) for t in state[:L]]
        s = [_flat(t) for t in state[L : 2 * L]]
        a0 = [_flat(t) for t in state[2 * L :]]
        a_out = [torch.empty_like(t) for t in w]
        ck_w = [t.new_empty(B * H, NS if save else 1, *t.shape[1:]) for t in w]
        ck_s = [t.new_empty(B * H, NS if save else 1, *t.shape[1:]) for t in w]
        common = dict(BT=_tile(b), BD=_tile(D), HAS_ANCHOR=R != 0, SAVE=save, CLIP=spec.clip > 0, PREC=_precision(q))
        if L == 1:

            def launch(BV: int) -> None:
                _d1_fwd_kernel[(B * H, triton.cdiv(D, BV))](
                    qf, kf, vf, y, *coefs, w[0], s[0], a0[0], ck_w[0], ck_s[0], a_out[0], T, R, b, D, NC, G,
                    spec.clip, BV=BV, **common,
                )  # fmt: skip

            _launch_fitting(launch, min(_tile(D), _VALUE_TILE))
        else:
            F = w[0].shape[-1]

            def launch(BF: int) -> None:
                _d2_fwd_kernel[(B * H,)](
                    qf, kf, vf, y, *coefs, w[0], w[1], s[0], s[1], a0[0], a0[1],
                    ck_w[0], ck_w[1], ck_s[0], ck_s[1], a_out[0], a_out[1], T, R, b, D, F, NC, G, spec.clip,
                    BF=BF, ACT=_ACTIVATION_IDS[spec.activation], **common,
                )  # fmt: skip

            _launch_fitting(launch, min(_tile(F), _HIDDEN_TILE))
        ctx.spec, ctx.segment_chunks, ctx.dtypes = spec, G, [t.dtype for t in state]
        if save:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, *state, *ck_w, *ck_s)
        shapes = [t.shape for t in state]
        outs = [t.view(shapes[i]).to(state[i].dtype) for i, t in enumerate(w + s + a_out)]
        return (y.view(B, H, T, D), *outs)

    @staticmethod
    def backward(ctx, dy: Tensor | None, *d_state: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.spec.backward == "torch":
            grads, d_in = _torch_backward(ctx, dy, d_state)
        else:
            grads, d_in = _triton_backward(ctx, dy, d_state)
        inputs = ctx.saved_tensors[:6]
        out_in = [
            g.to(t.dtype) if (g is not None and need) else None
            for g, t, need in zip(grads, inputs, ctx.needs_input_grad[1:7], strict=True)
        ]
        out_state = [
            g.to(dt) if (g is not None and need) else None
            for g, dt, need in zip(d_in, ctx.dtypes, ctx.needs_input_grad[7:], strict=True)
        ]
        return (None, *out_in, *out_state)


def _precision(q: Tensor) -> str:
    """`tl.dot` precision: float32 inputs get exact float32 products (FMA, no tensor cores); 16-bit inputs tf32
    tensor cores."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _launch_fitting(launch: Callable[[int], None], largest: int) -> int:
    """Call `launch(tile)` with the largest power-of-two tile ≤ `largest` (down to 16) whose compiled kernel fits
    the device's shared memory; returns that tile.

    Triton raises `OutOfResources` when it loads a kernel that needs more shared memory than the device has, before
    anything runs, so a smaller tile can simply be tried next. It matters on Hopper, where `tl.dot` keeps operands
    in shared memory: compiled for sm_90 (Triton 3.9, b = D = 64, bf16 inputs), the depth-2 backward needs 400 KB at
    a 64-unit hidden tile, 248 KB at 32 and 172 KB at 16 (the H100 allows 227 KB per program), the depth-1 backward
    242 KB at 64 value columns and 170 KB at 32; the forward kernels fit at 64 (144 KB and 105 KB).
    """
    tile = largest
    while True:
        try:
            launch(tile)
            return tile
        except OutOfResources:
            if tile <= 16:
                raise
            tile //= 2


def _triton_backward(ctx, dy: Tensor | None, d_state: tuple[Tensor | None, ...]) -> tuple[list, list]:
    """The Triton backward: one kernel launch over (B·H[, value tiles]), then autograd through the coefficients.

    Returns float32 gradients of (q, k, v, α, η, θ) and of (W, S, anchor) per layer (None where there is none).
    """
    spec, G = ctx.spec, ctx.segment_chunks
    L, b = spec.depth, spec.chunk_size
    q, k, v, alpha, eta, theta, *rest = ctx.saved_tensors
    state_in, ck_w, ck_s = rest[: 3 * L], rest[3 * L : 4 * L], rest[4 * L :]
    B, H, T, D = q.shape
    BH, R = B * H, spec.position % b
    NC = -(-(T + R) // b)
    need_gates = any(ctx.needs_input_grad[4:7])
    with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
        gates = [g.detach().reshape(BH, T).float().requires_grad_(need_gates) for g in (alpha, eta, theta)]
        coefs = layout_coefficients(*gates, R, b, spec.read)
    qf, kf, vf = (t.reshape(BH, T, D).contiguous() for t in (q, k, v))
    dyf = torch.zeros_like(qf) if dy is None else dy.reshape(BH, T, D).contiguous()
    w_in = [_flat(t) for t in state_in[:L]]
    a0 = [_flat(t) for t in state_in[2 * L :]]
    # Carried gradients of (W, S): w.r.t. the final state on entry, the incoming state when the kernel returns.
    dw = [_flat_or_zeros(g, w) for g, w in zip(d_state[:L], w_in, strict=True)]
    ds = [_flat_or_zeros(g, w) for g, w in zip(d_state[L : 2 * L], w_in, strict=True)]
    d_anchor_out = d_state[2 * L :]
    has_da = any(g is not None for g in d_anchor_out)
    da = [_flat_or_zeros(g, w) for g, w in zip(d_anchor_out, w_in, strict=True)]
    dao = [torch.zeros_like(w) for w in w_in]  # gradient of the incoming anchor (used when R ≠ 0)
    slots = [w.new_empty(BH, G, *w.shape[1:]) for w in w_in + w_in]  # chunk-start W, S of one segment
    dv = torch.zeros(BH, T, D, dtype=torch.float32, device=q.device)
    common = dict(BT=_tile(b), BD=_tile(D), HAS_ANCHOR=R != 0, HAS_DA=has_da, CLIP=spec.clip > 0, PREC=_precision(q))
    coef_in = [c.detach() for c in coefs]
    sums: dict[str, list[Tensor]] = {}  # partial sums per value tile (depth 1) of dq, dk and the coefficient grads

    def partial_sums(NVT: int) -> dict[str, list[Tensor]]:
        sums["parts"] = [torch.zeros(NVT, *c.shape, dtype=torch.float32, device=q.device) for c in coefs]
        sums["dq_dk"] = [torch.zeros(NVT, BH, T, D, dtype=torch.float32, device=q.device) for _ in range(2)]
        return sums

    if L == 1:

        def launch(BV: int) -> None:
            NVT = triton.cdiv(D, BV)
            p = partial_sums(NVT)
            _d1_bwd_kernel[(BH, NVT)](
                qf, kf, vf, dyf, *coef_in, ck_w[0], ck_s[0], a0[0], dw[0], ds[0], da[0], slots[0], slots[1],
                *p["dq_dk"], dv, *p["parts"], dao[0], T, R, b, D, NC, G, spec.clip, BV=BV, **common,
            )  # fmt: skip

        _launch_fitting(launch, min(_tile(D), _VALUE_TILE))
    else:
        F = w_in[0].shape[-1]
        scratch = [torch.empty(BH, b, F, dtype=torch.float32, device=q.device) for _ in range(2)]

        def launch(BF: int) -> None:
            p = partial_sums(1)
            _d2_bwd_kernel[(BH,)](
                qf, kf, vf, dyf, *coef_in, ck_w[0], ck_w[1], ck_s[0], ck_s[1], a0[0], a0[1], dw[0], dw[1],
                ds[0], ds[1], da[0], da[1], *slots, *scratch, *p["dq_dk"], dv, *p["parts"], dao[0], dao[1],
                T, R, b, D, F, NC, G, spec.clip, BF=BF, ACT=_ACTIVATION_IDS[spec.activation], **common,
            )  # fmt: skip

        _launch_fitting(launch, min(_tile(F), _HIDDEN_TILE))
    dq, dk = sums["dq_dk"]
    d_gates: list[Tensor | None] = [None] * 3
    if need_gates:
        d_coefs = [p.sum(0) for p in sums["parts"]]
        d_gates = list(torch.autograd.grad(coefs, gates, d_coefs, allow_unused=True))
    shape = q.shape
    grads = [dq.sum(0).view(shape), dk.sum(0).view(shape), dv.view(shape)]
    grads += [None if g is None else g.view(B, H, T) for g in d_gates]
    shapes = [t.shape for t in state_in]
    d_in = [g.view(shapes[i]) for i, g in enumerate(dw + ds)]
    d_in += [g.view(shapes[2 * L + i]) if R != 0 else None for i, g in enumerate(dao)]
    return grads, d_in


def _torch_backward(ctx, dy: Tensor | None, d_state: tuple[Tensor | None, ...]) -> tuple[list, list]:
    """The reference backward: recompute each segment of chunks with the torch closed form from its checkpoint,
    last first, and back-propagate through it with autograd. Same returns as `_triton_backward`."""
    spec, G = ctx.spec, ctx.segment_chunks
    L, b = spec.depth, spec.chunk_size
    q, k, v, alpha, eta, theta, *rest = ctx.saved_tensors
    state_in, ck_w, ck_s = rest[: 3 * L], rest[3 * L : 4 * L], rest[4 * L :]
    B, H, T, D = q.shape
    R = spec.position % b
    NC = -(-(T + R) // b)
    bounds = [max(0, c * b - R) for c in range(0, NC, G)] + [T]
    inputs = (q, k, v, alpha, eta, theta)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in inputs]
    d_w = [g.float() if g is not None else None for g in d_state[:L]]
    d_s = [g.float() if g is not None else None for g in d_state[L : 2 * L]]
    # The returned anchor is the last chunk's gradient point unless the call ends on a chunk border, where
    # the wrapper returns the weights instead (so its gradient arrives through d_w).
    d_a = [g.float() if g is not None else None for g in d_state[2 * L :]]
    d_in: list[Tensor | None] = [None] * (3 * L)
    for seg in range(len(bounds) - 2, -1, -1):
        sl = slice(bounds[seg], bounds[seg + 1])
        xs = [t[:, :, sl].detach().float().requires_grad_() for t in inputs]
        if seg == 0:
            leaves = [t.detach().float().requires_grad_() for t in state_in]
            w0, s0, a0 = leaves[:L], leaves[L : 2 * L], leaves[2 * L :]
        else:
            w0 = [c[:, seg].view(B, H, *c.shape[2:]).detach().requires_grad_() for c in ck_w]
            s0 = [c[:, seg].view(B, H, *c.shape[2:]).detach().requires_grad_() for c in ck_s]
            a0, leaves = w0, w0 + s0  # the segment starts on a chunk border: anchor = weights
        with torch.enable_grad():
            start = MemoryState(tuple(w0), tuple(s0), tuple(a0), spec.position + bounds[seg])
            y, end = torch_memory_update(
                *xs, start, chunk_size=b, activation=spec.activation, read=spec.read, clip=spec.clip
            )
        outs, outs_grad = [y], [dy[:, :, sl].float() if dy is not None else torch.zeros_like(y)]
        last = seg == len(bounds) - 2
        ends = [*end.weights, *end.surprise, *(end.anchor if last else ())]
        for t, g in zip(ends, [*d_w, *d_s, *(d_a if last else ())], strict=True):
            if g is not None:
                outs.append(t)
                outs_grad.append(g)
        got = torch.autograd.grad(outs, xs + leaves, outs_grad, allow_unused=True)
        for g_all, g in zip(grads, got[:6], strict=True):
            if g is not None:
                g_all[:, :, sl] = g
        d_leaves = got[6:]
        if seg == 0:
            d_in = list(d_leaves)
        else:
            d_w, d_s = list(d_leaves[:L]), list(d_leaves[L:])
    return grads, d_in


def triton_memory_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    state: MemoryState,
    *,
    chunk_size: int = 16,
    activation: str = "silu",
    read: str = "inclusive",
    clip: float = 0.0,
    backward: str = "triton",
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Triton forward and backward (fp32 accumulation) of `torch_memory_update`, same signature and result.

    Args:
        q, k, v: `[B, H, T, D]` float32, bfloat16 or float16 (CUDA, or CPU under TRITON_INTERPRET=1).
        alpha, eta, theta: `[B, H, T]`.
        state: incoming `MemoryState` of depth 1 or 2.
        chunk_size: b (≤ 128).
        activation: silu, gelu or tanh.
        read: "inclusive" or "strict".
        clip: c > 0 clamps each token's output error to [−c, c] (Huber inner loss, mlp.py); 0: Eq. 12.
        backward: "triton" (the backward kernels) or "torch" (the reference: torch closed form recomputed per
            segment and differentiated by autograd; same gradients, slower).
        norm: must be None: the memory M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`) has no Triton kernel.
    Returns:
        y `[B, H, T, D]` in q's dtype and the state after the last token, in the incoming state's dtypes.
    """
    if norm is not None:
        raise ValueError("triton_memory_update cannot run model.memory_norm='ln'; use kernel 'torch' or 'auto'")
    reason = unsupported_reason(q, k, v, state, chunk_size, activation, read)
    if reason is not None:
        raise ValueError(f"triton_memory_update cannot run: {reason}")
    if backward not in _BACKWARDS:
        raise ValueError(f"backward: expected one of {', '.join(_BACKWARDS)}, got {backward!r}")
    T = q.shape[2]
    if T == 0:
        return q.new_zeros(q.shape), state
    L = len(state.weights)
    spec = _Spec(L, state.position, chunk_size, activation, read, float(clip), backward)
    y, *flat = _TritonMemoryUpdate.apply(spec, q, k, v, alpha, eta, theta, *state.weights, *state.surprise,
                                         *state.anchor)  # fmt: skip
    weights, surprise, anchor = tuple(flat[:L]), tuple(flat[L : 2 * L]), tuple(flat[2 * L :])
    pos = state.position + T
    if pos % chunk_size == 0:
        anchor = weights  # the next call starts a chunk: its gradient point is the current weights
    return y, MemoryState(weights, surprise, anchor, pos)


__all__ = ["INTERPRET", "layout_coefficients", "triton_memory_update", "unsupported_reason"]
