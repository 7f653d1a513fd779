"""Triton forward kernels for the chunked memory update (spec §3.2-3.3), behind a `torch.autograd.Function`.

The forward runs one program per (batch, head) (depth 1: also per value-column tile) that loops over the
chunks in order, carrying the state: per chunk it takes the inner gradients at the chunk-start weights
(Eq. 12, closed form), reads every token by the dual form (spec §3.3) and writes the chunk-end state
(Eqs. 13-14, §3.2). The per-chunk coefficients β, γ, E, C, θP are O(b²) and come from chunk.py's
`chunk_coefficients` (torch), so both paths use the same numbers. The backward is NOT a Triton kernel: it
recomputes segments of chunks with the torch closed form (`chunk_memory_update`) from state checkpoints saved
by the forward, and back-propagates through them with autograd. README.md in this folder has the derivation,
the tiling and the shape legend.

Shape legend: B batch, H heads, T tokens, D head dim, F memory hidden width, b chunk size, BH = B·H programs,
NC chunks in this call, NS checkpoint segments; BT/BD/BF/BV power-of-two tiles of b, D, F and value columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from titans_cli.ops.memory_update.chunk import chunk_coefficients, chunk_memory_update
from titans_cli.ops.memory_update.state import MemoryState

# Triton reads TRITON_INTERPRET when the kernels below are decorated; then they run on CPU tensors (tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACTIVATION_IDS = {"silu": 0, "gelu": 1, "tanh": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
def _load_tokens(ptr, c, R, T, D, b, BT: tl.constexpr, BD: tl.constexpr):
    """Rows of chunk c as a `[BT, BD]` fp32 tile; token t = c·b − R + i, rows outside [0, T) read as 0."""
    i = tl.arange(0, BT)
    d = tl.arange(0, BD)
    t = c * b - R + i
    mask = ((i < b) & (t >= 0) & (t < T))[:, None] & (d < D)[None, :]
    return tl.load(ptr + t[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32), t, mask


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
def _d1_chunk(c, W, S, A, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, col0,
              BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One chunk of the matrix memory M(k) = k W on value columns [col0, col0+BV); returns chunk-end W, S."""
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    i = tl.arange(0, BT)
    cols = col0 + tl.arange(0, BV)
    vmask = ((i < b) & (t >= 0) & (t < T))[:, None] & (cols < D)[None, :]
    V = tl.load(v + t[:, None] * D + cols[None, :], mask=vmask, other=0.0).to(tl.float32)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    err = tl.dot(K, A, input_precision=PREC) - V  # δ_j = k_j W_anchor − v_j   [BT, BV]
    # Dual-form read (spec §3.3): q_i W_i = β_i q_i W_0 + γ_i q_i S_0 − Σ_j C_ij (q_i·k_j) δ_j
    qk = r_c * tl.dot(Q, tl.trans(K), input_precision=PREC)
    out = r_beta[:, None] * tl.dot(Q, W, input_precision=PREC) + r_gamma[:, None] * tl.dot(
        Q, S, input_precision=PREC
    )
    out -= tl.dot(qk, err, input_precision=PREC)
    tl.store(y + t[:, None] * D + cols[None, :], out.to(y.dtype.element_ty), mask=vmask)
    # Chunk end (spec §3.2): W_n = β_n W_0 + γ_n S_0 − Kᵀ diag(C_n,:) Δ, S_n = E_n S_0 − Kᵀ diag(θ⊙P_n,:) Δ
    kt = tl.trans(K)
    W_new = tl.load(eb + c) * W + tl.load(eg + c) * S - tl.dot(kt, c_end[:, None] * err, input_precision=PREC)
    S_new = tl.load(ee + c) * S - tl.dot(kt, tp_end[:, None] * err, input_precision=PREC)
    return W_new, S_new


@triton.jit
def _d1_fwd_kernel(q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, w, s, a0, ck_w, ck_s, a_out,
                   T, R, b, D, NC, G,
                   BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, HAS_ANCHOR: tl.constexpr,
                   SAVE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
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
        W, S = _d1_chunk(
            c, W, S, A, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, col0, BT, BD, BV, PREC
        )
    tl.store(w + sidx, W, mask=smask)
    tl.store(s + sidx, S, mask=smask)


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
def _d2_chunk(c, a1, a2, w1, w2, s1, s2, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, T, R, b, D, F,
              BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr,
              PREC: tl.constexpr):  # fmt: skip
    """One chunk of the MLP memory M(k) = σ(k W1) W2; updates w1, w2, s1, s2 in place (fp32 scratch)."""
    Q, t, mask = _load_tokens(q, c, R, T, D, b, BT, BD)
    K, _, _ = _load_tokens(k, c, R, T, D, b, BT, BD)
    V, _, _ = _load_tokens(v, c, R, T, D, b, BT, BD)
    r_beta, r_gamma, r_c, c_end, tp_end = _load_coefficients(rb, rg, rc, ec, etp, c, b, BT)
    beta_n, gamma_n, e_n = tl.load(eb + c), tl.load(eg + c), tl.load(ee + c)
    d = tl.arange(0, BD)
    NF = tl.cdiv(F, BF)
    # Pass 1 over hidden tiles: the prediction at the anchor, σ(K A1) A2, for the output error E2.
    pred = tl.zeros((BT, BD), dtype=tl.float32)
    for j in range(0, NF):
        f = j * BF + tl.arange(0, BF)
        m1 = (d < D)[:, None] & (f < F)[None, :]
        m2 = (f < F)[:, None] & (d < D)[None, :]
        A1 = tl.load(a1 + d[:, None] * F + f[None, :], mask=m1, other=0.0)
        A2 = tl.load(a2 + f[:, None] * D + d[None, :], mask=m2, other=0.0)
        act = _act(tl.dot(K, A1, input_precision=PREC), ACT)
        pred += tl.dot(act, A2, input_precision=PREC)
    e2 = pred - V  # ∂ℓ/∂(a W2) for ½‖M(k) − v‖²   [BT, BD]
    qk = r_c * tl.dot(Q, tl.trans(K), input_precision=PREC)  # C̃ ⊙ Q Kᵀ, the layer-1 dual-form mixing
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    ha = tl.zeros((BT, BT), dtype=tl.float32)  # H̃ Aᵀ, summed over hidden tiles
    # Pass 2 over hidden tiles: layer-1 errors, layer-1 reads (a tile of hidden units is complete on its own),
    # the partial layer-2 read, and the chunk-end state of the tile.
    for j in range(0, NF):
        f = j * BF + tl.arange(0, BF)
        m1 = (d < D)[:, None] & (f < F)[None, :]
        m2 = (f < F)[:, None] & (d < D)[None, :]
        i1 = d[:, None] * F + f[None, :]
        i2 = f[:, None] * D + d[None, :]
        A1 = tl.load(a1 + i1, mask=m1, other=0.0)
        A2 = tl.load(a2 + i2, mask=m2, other=0.0)
        W1 = tl.load(w1 + i1, mask=m1, other=0.0)
        S1 = tl.load(s1 + i1, mask=m1, other=0.0)
        W2 = tl.load(w2 + i2, mask=m2, other=0.0)
        S2 = tl.load(s2 + i2, mask=m2, other=0.0)
        z = tl.dot(K, A1, input_precision=PREC)
        act = _act(z, ACT)
        d1 = tl.dot(e2, tl.trans(A2), input_precision=PREC) * _act_grad(z, ACT)  # δ1 = (E2 A2ᵀ) ⊙ σ'(Z)
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
        # The anchor may alias w1/w2: every thread must have loaded this tile before any thread overwrites it.
        tl.debug_barrier()
        tl.store(w1 + i1, W1n, mask=m1)
        tl.store(s1 + i1, S1n, mask=m1)
        tl.store(w2 + i2, W2n, mask=m2)
        tl.store(s2 + i2, S2n, mask=m2)
    out = acc - tl.dot(r_c * ha, e2, input_precision=PREC)
    tl.store(y + t[:, None] * D + d[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the next chunk reads the state tiles written above


@triton.jit
def _d2_fwd_kernel(q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp, w1, w2, s1, s2, a01, a02,
                   ck_w1, ck_w2, ck_s1, ck_s2, ao1, ao2, T, R, b, D, F, NC, G,
                   BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr,
                   HAS_ANCHOR: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
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
    ck_w1, ck_w2, ck_s1, ck_s2 = (
        ck_w1 + bh * NS * DF,
        ck_w2 + bh * NS * DF,
        ck_s1 + bh * NS * DF,
        ck_s2 + bh * NS * DF,
    )
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
        _d2_chunk(c, p1, p2, w1, w2, s1, s2, q, k, v, y, rb, rg, rc, eb, eg, ee, ec, etp,
                  T, R, b, D, F, BT, BD, BF, ACT, PREC)  # fmt: skip


def layout_coefficients(
    alpha: Tensor, eta: Tensor, theta: Tensor, offset: int, b: int, read: str
) -> list[Tensor]:
    """Per-chunk coefficients in the kernel's chunk layout, float32, from gates `[BH, T]`.

    Chunk c holds tokens t = c·b − offset + i in slots i < b. Each chunk's coefficients are exactly the torch
    path's (`chunk_coefficients` on that chunk's own tokens: a partial first or last chunk is a shorter chunk,
    not a padded one); slots without a token get zeros, which the kernels never read into the state.

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
    q: Tensor, state: MemoryState, chunk_size: int, activation: str, read: str
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


@dataclass(frozen=True)
class _Spec:
    depth: int
    position: int
    chunk_size: int
    activation: str
    read: str


class _TritonMemoryUpdate(torch.autograd.Function):
    """Inputs q, k, v, α, η, θ, then W, S, anchor per layer; outputs y, then W, S, anchor per layer."""

    @staticmethod
    def forward(ctx, spec: _Spec, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor,
                *state: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
        B, H, T, D = q.shape
        L, b = spec.depth, spec.chunk_size
        R = spec.position % b
        NC = -(-(T + R) // b)
        G = max(1, _SEGMENT_TOKENS // b)
        NS = -(-NC // G)
        save = any(ctx.needs_input_grad)
        gates = (t.reshape(B * H, T) for t in (alpha, eta, theta))
        # Under bf16 autocast the O(b²) coefficient matmuls would drop to bf16; keep them float32 (spec §3.2).
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
        prec = (
            "ieee" if q.dtype == torch.float32 else "tf32"
        )  # fp32 inputs keep fp32 products on tensor cores
        common = dict(BT=_tile(b), BD=_tile(D), HAS_ANCHOR=R != 0, SAVE=save, PREC=prec)
        if L == 1:
            BV = min(_tile(D), _VALUE_TILE)
            _d1_fwd_kernel[(B * H, triton.cdiv(D, BV))](
                qf, kf, vf, y, *coefs, w[0], s[0], a0[0], ck_w[0], ck_s[0], a_out[0], T, R, b, D, NC, G,
                BV=BV, **common,
            )  # fmt: skip
        else:
            F = w[0].shape[-1]
            _d2_fwd_kernel[(B * H,)](
                qf, kf, vf, y, *coefs, w[0], w[1], s[0], s[1], a0[0], a0[1],
                ck_w[0], ck_w[1], ck_s[0], ck_s[1], a_out[0], a_out[1], T, R, b, D, F, NC, G,
                BF=min(_tile(F), _HIDDEN_TILE), ACT=_ACTIVATION_IDS[spec.activation], **common,
            )  # fmt: skip
        ctx.spec, ctx.segment_chunks, ctx.dtypes = spec, G, [t.dtype for t in state]
        if save:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, *state, *ck_w, *ck_s)
        shapes = [t.shape for t in state]
        outs = [t.view(shapes[i]).to(state[i].dtype) for i, t in enumerate(w + s + a_out)]
        return (y.view(B, H, T, D), *outs)

    @staticmethod
    def backward(ctx, dy: Tensor | None, *d_state: Tensor | None) -> tuple[Tensor | None, ...]:
        """Recompute each segment of chunks with the torch closed form from its checkpoint, last first."""
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
                y, end = chunk_memory_update(
                    *xs, start, chunk_size=b, activation=spec.activation, read=spec.read
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
        out_in = [
            g.to(t.dtype) if need else None
            for g, t, need in zip(grads, inputs, ctx.needs_input_grad[1:7], strict=True)
        ]
        out_state = [
            g.to(dt) if (g is not None and need) else None
            for g, dt, need in zip(d_in, ctx.dtypes, ctx.needs_input_grad[7:], strict=True)
        ]
        return (None, *out_in, *out_state)


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
) -> tuple[Tensor, MemoryState]:
    """Triton forward (fp32 accumulation) of `chunk_memory_update`, same signature and result.

    Args:
        q, k, v: `[B, H, T, D]` float32, bfloat16 or float16 (CUDA, or CPU under TRITON_INTERPRET=1).
        alpha, eta, theta: `[B, H, T]`.
        state: incoming `MemoryState` of depth 1 or 2.
        chunk_size: b (≤ 128).
        activation: silu, gelu or tanh.
        read: "inclusive" or "strict".
    Returns:
        y `[B, H, T, D]` in q's dtype and the state after the last token, in the incoming state's dtypes.
    """
    reason = unsupported_reason(q, state, chunk_size, activation, read)
    if reason is not None:
        raise ValueError(f"triton_memory_update cannot run: {reason}")
    T = q.shape[2]
    if T == 0:
        return q.new_zeros(q.shape), state
    L = len(state.weights)
    spec = _Spec(L, state.position, chunk_size, activation, read)
    y, *flat = _TritonMemoryUpdate.apply(spec, q, k, v, alpha, eta, theta, *state.weights, *state.surprise,
                                         *state.anchor)  # fmt: skip
    weights, surprise, anchor = tuple(flat[:L]), tuple(flat[L : 2 * L]), tuple(flat[2 * L :])
    pos = state.position + T
    if pos % chunk_size == 0:
        anchor = weights  # the next call starts a chunk: its gradient point is the current weights
    return y, MemoryState(weights, surprise, anchor, pos)


__all__ = ["INTERPRET", "layout_coefficients", "triton_memory_update", "unsupported_reason"]
