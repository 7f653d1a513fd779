"""Chunked closed form of the memory update (docs/design.md §3.2-3.3; Eqs. 16-18 corrected): the torch fast path.

Per chunk of n ≤ b tokens, with start state (M_0, S_0) and gradient point W_g (the chunk-start weights):
    u_j  = ∇ℓ(W_g; k_j, v_j) = a_jᵀ δ_j per layer           (closed form, mlp.py)
    D_im = Π_{l=m+1..i} (1−α_l),  P_mj = Π_{l=j+1..m} η_l     (lower-triangular, built in log space)
    C    = (D P) diag(θ),  γ = D E,  β_i = Π_{l≤i} (1−α_l),  E_i = Π_{l≤i} η_l
    M_i  = β_i M_0 + γ_i S_0 − Σ_{j≤i} C_ij u_j,   S_i = E_i S_0 − Σ_{j≤i} θ_j P_ij u_j
Per-token reads use the dual form, layer by layer, without materialising the n weight copies:
    Z̃ = diag(β) Ã W_0 + diag(γ) Ã S_0 − (C ⊙ Ã Aᵀ) Δ
and the chunk-end state is two matmuls per layer. The outer loop (docs/design.md §2.7) differentiates it in one of
two ways: plain autograd through `naive.naive_chunk_step` (the readable reference, naive.py), or here
`_FusedChunkStep`, a `torch.autograd.Function` with a hand-written backward: autograd handles only the O(b²)
coefficients, the backward of the matmuls is written out (README.md, "Backward of the torch path"). With the memory
norm (`model.memory_norm = "ln"`, M(x) = x + LN_h(f(x)), mlp.py) the inner error passes through LN and each read
gets q + LN_h(·); the backward then has LayerNorm terms, its second order included (README.md, `norm`).

Shape legend: B batch, H heads, n tokens in the chunk, weights `[B, H, d_in, d_out]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd.function import once_differentiable

from titans_cli.backbone.ops.memory_update.mlp import ACTIVATIONS, LN_EPS
from titans_cli.backbone.ops.memory_update.state import MemoryState

# Coefficients below e^-69 ≈ 1e-30 are zeroed: float32 denormals there take a slow microcode path on x86
# (docs/performance.md: 3-4x slower steps) and contribute nothing.
_LOG_FLOOR = -69.0
_FLOOR = 1e-30
# Gates are clamped away from 0 before the log so that ratios of products never become 0/0 or −inf − (−inf)
# (docs/design.md §3.2). The floor sits just below e^_LOG_FLOOR, so a gate that is exactly 0 still gives exact zeros.
_GATE_FLOOR = 0.9 * _FLOOR


def _flush(x: Tensor) -> Tensor:
    """Zero non-negative coefficients below `_FLOOR` (sums of products can land in the denormal range)."""
    return torch.where(x < _FLOOR, torch.zeros_like(x), x)


def _decay_matrix(log_cum: Tensor) -> Tensor:
    """exp(c_i − c_j) for j ≤ i, 0 above the diagonal: `[..., n] → [..., n, n]`."""
    n = log_cum.shape[-1]
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    keep = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    keep = keep & (diff > _LOG_FLOOR)
    return torch.where(keep, diff, torch.full_like(diff, float("-inf"))).exp()


def chunk_coefficients(
    alpha: Tensor, eta: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Coefficients of one chunk from per-token gates `[..., n]`.

    Returns:
        beta `[..., n]` (β_i), gamma `[..., n]` (γ_i), E `[..., n]` (E_i), C `[..., n, n]` (lower-triangular,
        diagonal included), and theta_p `[..., n]` = θ_j P_nj, the momentum weights of the chunk-end surprise.
    """
    log_keep = torch.log(torch.clamp(1.0 - alpha, min=_GATE_FLOOR)).cumsum(-1)
    log_eta = torch.log(torch.clamp(eta, min=_GATE_FLOOR)).cumsum(-1)
    decay = _decay_matrix(log_keep)  # D
    momentum = _decay_matrix(log_eta)  # P
    beta = _flush(log_keep.exp())
    e = _flush(log_eta.exp())
    gamma = _flush((decay @ e.unsqueeze(-1)).squeeze(-1))
    c = _flush((decay @ momentum) * theta.unsqueeze(-2))
    theta_p = _flush(theta * momentum[..., -1, :])
    return beta, gamma, e, c, theta_p


def read_rows(beta: Tensor, gamma: Tensor, c: Tensor, read: str) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficient rows of the reads: the chunk's own rows (inclusive), or shifted one row down (strict)."""
    if read == "inclusive":
        return beta, gamma, c
    # Strict read y_i = M_{i−1}(q_i): the coefficients of the previous row (row 0 is the start state).
    r_beta = torch.cat([torch.ones_like(beta[..., :1]), beta[..., :-1]], dim=-1)
    r_gamma = torch.cat([torch.zeros_like(gamma[..., :1]), gamma[..., :-1]], dim=-1)
    r_c = torch.cat([torch.zeros_like(c[..., :1, :]), c[..., :-1, :]], dim=-2)
    return r_beta, r_gamma, r_c


# --- Fused chunk step: hand-written backward ---
def _act_grads(activation: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """σ'(z) and σ''(z): δ of a hidden layer is (e W₂ᵀ) ⊙ σ'(z), so its backward needs σ''."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if activation == "gelu":
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        return cdf + z * pdf, pdf * (2.0 - z * z)
    if activation == "tanh":
        t = torch.tanh(z)
        g = 1.0 - t * t
        return g, -2.0 * t * g
    raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _acc(total: Tensor | None, x: Tensor) -> Tensor:
    return x if total is None else total + x


def _mm(acc: Tensor | None, x: Tensor, y: Tensor, alpha: float = 1.0, *, owned: bool = True) -> Tensor:
    """acc + alpha·(x @ y) for `[..., i, k] @ [..., k, j]`, accumulated inside the GEMM (`baddbmm_`), which saves
    a full elementwise pass and an allocation per sum of products. `acc` None means 0. With `owned` (a temporary
    that nothing else refers to) the sum overwrites `acc`."""
    if acc is None:
        out = x @ y
        return out if alpha == 1.0 else out * alpha
    if torch.is_autocast_enabled(acc.device.type) or not owned:
        # Under autocast baddbmm would round the accumulator (e.g. the carried state) to 16 bits.
        return torch.add(acc, x @ y, alpha=alpha)
    lead = acc.shape[:-2]
    x3 = x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    y3 = y.expand(*lead, *y.shape[-2:]).reshape(-1, *y.shape[-2:])
    return acc.reshape(-1, *acc.shape[-2:]).baddbmm_(x3, y3, alpha=alpha).view(acc.shape)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _ln_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """ẑ = (z − μ) r and r = 1/√(σ² + ε) over the last dim (the memory norm's LayerNorm without affine, mlp.py)."""
    zc = z - z.mean(-1, keepdim=True)
    r = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    return zc * r, r


def _ln_back(g: Tensor, zh: Tensor, r: Tensor) -> Tensor:
    """LayerNorm's backward: ∂/∂z of ⟨g, ẑ⟩ is r (g − mean g − ẑ mean(g ẑ)) (also the map δ_L = r P(γ e))."""
    return r * (g - g.mean(-1, keepdim=True) - zh * (g * zh).mean(-1, keepdim=True))


def _sum_to_head(x: Tensor) -> Tensor:
    """`[..., H, n, D]` summed to the `[H, 1, D]` of γ and β (over the batch and the tokens)."""
    if x.dim() > 3:  # (an empty dim tuple would sum over everything)
        x = x.sum(tuple(range(x.dim() - 3)))
    return x.sum(-2, keepdim=True)


class _FusedChunkStep(torch.autograd.Function):
    """The heavy part of `naive.naive_chunk_step` with a hand-written backward.

    Takes the read rows (β̃, γ̃, C̃; already shifted for the strict read) and the chunk-end coefficients
    (β_n, γ_n, E_n `[B, H]`, C_{n,:}, θ⊙P_{n,:} `[B, H, n]`) as inputs, so autograd differentiates the small
    O(b²) coefficient computation and this function only the O(n·d²) matmuls. Forward saves the inner-gradient
    factors (a, δ, pre-activations, δW ᵀ), and per layer the read input h, pre-activation z, h W, h S and h Aᵀ;
    backward reverses, in order, the chunk-end state, the dual-form reads layer by layer and the closed-form inner
    gradients (which needs σ'' because δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ σ'(p_l)). Row scalings are moved onto the
    smaller operand (diag(c) A R = (c ⊙ A) R) and sums of products are accumulated inside the GEMM (`_mm`).
    """

    @staticmethod
    def forward(
        ctx, activation, n_layers, clip, q, k, v, r_beta, r_gamma, r_c, b_end, g_end, e_end, c_end, tp, ln_w, ln_b,
        *state,
    ):  # fmt: skip
        L = n_layers
        has_norm = ln_w is not None  # M(x) = x + LN_h(f(x)) with γ = ln_w, β = ln_b `[H, 1, D]` (mlp.py)
        weights, surprise, anchor = state[:L], state[L : 2 * L], state[2 * L :]
        act, act_grad = ACTIVATIONS[activation]
        # Inner-gradient factors at the anchor (mlp.py's closed form, keeping what backward needs).
        xs, ps, ts = [k], [], []
        for l in range(L - 1):
            ps.append(xs[-1] @ anchor[l])
            xs.append(act(ps[-1]))
        if has_norm:
            # Eq. 12 on M(k) = k + γ ẑ + β, ẑ = LN(z_L) without affine: e = M(k) − v (clamped), then δ_L = ∂ℓ/∂z_L
            # = r (g − mean g − ẑ mean(g ẑ)), g = γ e (mlp._ln_inner_error).
            zh_k, rn_k = _ln_stats(xs[-1] @ anchor[-1])
            d = k + zh_k * ln_w + ln_b - v
        else:
            d = xs[-1] @ anchor[-1] - v  # δ_L = M(k) − v
        inside = None
        if clip > 0:  # Huber inner loss (mlp.py): δ_L clamped; its backward passes gradient only where |δ_L| < c
            inside = d.abs() <= clip
            d = d.clamp(-clip, clip)
        if has_norm:
            e_k = d
            d = _ln_back(e_k * ln_w, zh_k, rn_k)
        ds = [d]
        for l in range(L - 1, 0, -1):
            ts.append(d @ _t(anchor[l]))
            d = ts[-1] * act_grad(ps[l - 1])
            ds.append(d)
        ds.reverse()
        ts.reverse()  # ts[l] = δ_{l+1} A_{l+1}ᵀ, so δ_l = ts[l] ⊙ σ'(p_l)
        rb, rg = r_beta.unsqueeze(-1), r_gamma.unsqueeze(-1)
        ce, tpu = c_end.unsqueeze(-1), tp.unsqueeze(-1)
        be, ge, ee = b_end[..., None, None], g_end[..., None, None], e_end[..., None, None]
        hs, zs, hw_all, hsv_all, has = [q], [], [], [], []
        new_w, new_s = [], []
        h = q
        for l in range(L):
            a, d, w, s = xs[l], ds[l], weights[l], surprise[l]
            hw, hsv, ha = h @ w, h @ s, h @ _t(a)
            # Dual form (docs/design.md §3.3): z = β̃ hW + γ̃ hS − (C̃ ⊙ h Aᵀ) Δ.
            z = _mm(torch.addcmul(rb * hw, rg, hsv), r_c * ha, d, alpha=-1.0)
            hw_all.append(hw)
            hsv_all.append(hsv)
            has.append(ha)
            if l < L - 1:
                zs.append(z)
                h = act(z)
                hs.append(h)
            elif has_norm:  # Eq. 15 read y = q + LN_h(f(q)), per token after the dual form
                zh_q, rn_q = _ln_stats(z)
                h = q + zh_q * ln_w + ln_b
            else:
                h = z
            # Chunk end (docs/design.md §3.2): W' = β_n W + γ_n S − Aᵀ diag(c) Δ,  S' = E_n S − Aᵀ diag(θP) Δ.
            new_w.append(_mm(torch.addcmul(be * w, ge, s), _t(a), ce * d, alpha=-1.0))
            new_s.append(_mm(ee * s, _t(a), tpu * d, alpha=-1.0))
        ctx.activation, ctx.n_layers, ctx.clipped, ctx.has_norm = activation, L, inside is not None, has_norm
        dev = q.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(
            r_beta, r_gamma, r_c, b_end, g_end, e_end, c_end, tp, *state, *xs, *ps, *ts, *ds, *hs, *zs, *hw_all,
            *hsv_all, *has, *(() if inside is None else (inside,)),
            *((ln_w, zh_k, rn_k, e_k, zh_q, rn_q) if has_norm else ()),
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        return (h, *new_w, *new_s)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *g_out):
        # Backward runs under the forward's autocast state (as `torch.amp.custom_bwd` does), so that 16-bit saved
        # tensors meet matmuls that cast both operands alike.
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return _FusedChunkStep._backward(ctx, gy, g_out)

    @staticmethod
    def _backward(ctx, gy, g_out):
        L, activation = ctx.n_layers, ctx.activation
        saved = list(ctx.saved_tensors)
        r_beta, r_gamma, r_c, b_end, g_end, e_end, c_end, tp = saved[:8]
        pos = 8

        def take(m: int) -> list[Tensor]:
            nonlocal pos
            out = saved[pos : pos + m]
            pos += m
            return out

        weights, surprise, anchor = take(L), take(L), take(L)
        xs, ps, ts, ds = take(L), take(L - 1), take(L - 1), take(L)
        hs, zs, hw_all, hsv_all, has = take(L), take(L - 1), take(L), take(L), take(L)
        inside = saved[pos] if ctx.clipped else None  # saved after the activations, only with the clamp
        pos += int(ctx.clipped)
        g_lnw = g_lnb = gk_norm = None
        if ctx.has_norm:  # saved last, only with the memory norm
            ln_w, zh_k, rn_k, e_k, zh_q, rn_q = saved[pos : pos + 6]
        ga: list[Tensor | None] = [None] * L  # ∂/∂a_l (layer inputs at the anchor)
        gd: list[Tensor | None] = [None] * L  # ∂/∂δ_l
        gw: list[Tensor | None] = [None] * L
        gs: list[Tensor | None] = [None] * L
        gb_end = gg_end = ge_end = gc_end = g_tp = None
        # 1. Chunk-end state. With R = ∂/∂W', Q = ∂/∂S': ∂/∂A = −diag(c) Δ Rᵀ − diag(θP) Δ Qᵀ,
        #    ∂/∂Δ = −diag(c) A R − diag(θP) A Q, ∂/∂c_j = −a_j · (R δ_jᵀ).
        gW_out, gS_out = g_out[:L], g_out[L:]
        nce, ntp = -c_end.unsqueeze(-1), -tp.unsqueeze(-1)
        for l in range(L):
            R, Q = gW_out[l], gS_out[l]
            if R is None and Q is None:
                continue
            w, s, a, d = weights[l], surprise[l], xs[l], ds[l]
            R = torch.zeros_like(Q) if R is None else R
            Q = torch.zeros_like(R) if Q is None else Q
            gw[l] = b_end[..., None, None] * R
            gs[l] = torch.addcmul(g_end[..., None, None] * R, e_end[..., None, None], Q)
            gb_end = _acc(gb_end, (w * R).sum((-2, -1)))
            gg_end = _acc(gg_end, (s * R).sum((-2, -1)))
            ge_end = _acc(ge_end, (s * Q).sum((-2, -1)))
            d_r, d_q = d @ _t(R), d @ _t(Q)  # [n, d_in]
            ga[l] = torch.addcmul(nce * d_r, ntp, d_q)
            gc_end = _acc(gc_end, -(a * d_r).sum(-1))
            g_tp = _acc(g_tp, -(a * d_q).sum(-1))
            gd[l] = _mm((a * nce) @ R, a * ntp, Q)
        # 2. Reads, last layer first: z = β̃ hW + γ̃ hS − (C̃ ⊙ h Aᵀ) Δ.
        g_rbeta = g_rgamma = g_rc = gq = None
        rb, rg = r_beta.unsqueeze(-1), r_gamma.unsqueeze(-1)
        gz = gy
        if gy is not None and ctx.has_norm:
            # y = q + γ ẑ_q + β: q gets gy directly, γ and β their sums, z the LayerNorm backward of γ gy.
            g_lnw, g_lnb = _sum_to_head(gy * zh_q), _sum_to_head(gy)
            gz = _ln_back(ln_w * gy, zh_q, rn_q)
        for l in range(L - 1, -1, -1) if gz is not None else ():
            w, s, a, d, h, ha = weights[l], surprise[l], xs[l], ds[l], hs[l], has[l]
            g_rbeta = _acc(g_rbeta, (gz * hw_all[l]).sum(-1))
            g_rgamma = _acc(g_rgamma, (gz * hsv_all[l]).sum(-1))
            gzb, gzg = rb * gz, rg * gz
            gw[l] = _mm(gw[l], _t(h), gzb)
            gs[l] = _mm(gs[l], _t(h), gzg)
            g_g = (gz @ _t(d)).neg_()  # ∂/∂(C̃ ⊙ h Aᵀ)
            g_rc = _acc(g_rc, g_g * ha)
            g_ha = g_g * r_c
            gh = _mm(_mm(gzb @ _t(w), gzg, _t(s)), g_ha, a)
            ga[l] = _mm(ga[l], _t(g_ha), h)
            gd[l] = _mm(gd[l], _t(r_c * ha), gz, alpha=-1.0)
            if l > 0:
                gz = gh * ACTIVATIONS[activation][1](zs[l - 1])
            else:
                gq = gh
        # 3. Inner-gradient factors at the anchor: a_0 = k, p_l = a_l A_l, a_{l+1} = σ(p_l),
        #    δ_{L−1} = a_{L−1} A_{L−1} − v, δ_l = (δ_{l+1} A_{l+1}ᵀ) ⊙ σ'(p_l).
        ganc: list[Tensor | None] = [None] * L
        gp: list[Tensor | None] = [None] * (L - 1)
        sig1: list[Tensor] = []
        for l in range(L - 1):
            s1, s2 = _act_grads(activation, ps[l])
            sig1.append(s1)
            if gd[l] is None:
                continue
            gt = gd[l] * s1
            gp[l] = gd[l] * ts[l] * s2
            gd[l + 1] = _mm(gd[l + 1], gt, anchor[l + 1])
            ganc[l + 1] = _t(gt) @ ds[l + 1]
        gpred = gd[L - 1]
        if ctx.has_norm and gpred is not None:
            # δ_L = r P(γ e), P = I − 11ᵀ/D − ẑẑᵀ/D (symmetric), e = k + γ ẑ + β − v (clamped), ẑ = (z − μ) r:
            # back to e (hence k, v, γ, β) and to z_L, through P, through r and through ẑ (LayerNorm's second order).
            gvec = e_k * ln_w
            pg = gvec - gvec.mean(-1, keepdim=True) - zh_k * (gvec * zh_k).mean(-1, keepdim=True)
            g_gvec = _ln_back(gpred, zh_k, rn_k)  # rn P gpred
            g_rn = (gpred * pg).sum(-1, keepdim=True)
            g_zh = -rn_k * ((gvec * zh_k).mean(-1, keepdim=True) * gpred + (gpred * zh_k).mean(-1, keepdim=True) * gvec)
            g_e = g_gvec * ln_w
            g_lnw = _acc(g_lnw, _sum_to_head(g_gvec * e_k))
            if inside is not None:
                g_e = g_e * inside
            gk_norm, gv = g_e, -g_e
            g_lnb = _acc(g_lnb, _sum_to_head(g_e))
            g_lnw = g_lnw + _sum_to_head(g_e * zh_k)
            g_zh = g_zh + g_e * ln_w
            gpred = _ln_back(g_zh, zh_k, rn_k) - (rn_k * rn_k / zh_k.shape[-1]) * g_rn * zh_k
        else:
            if gpred is not None and inside is not None:
                gpred = gpred * inside
            gv = None if gpred is None else -gpred
        gx = ga[L - 1]
        if gpred is not None:
            ganc[L - 1] = _mm(ganc[L - 1], _t(xs[L - 1]), gpred)
            gx = _mm(gx, gpred, _t(anchor[L - 1]))
        for l in range(L - 2, -1, -1):
            if gx is not None:
                gp[l] = gx * sig1[l] if gp[l] is None else torch.addcmul(gp[l], gx, sig1[l])
            gx = ga[l]
            if gp[l] is not None:
                ganc[l] = _mm(ganc[l], _t(xs[l]), gp[l])
                gx = _mm(gx, gp[l], _t(anchor[l]))
        if gk_norm is not None:  # k enters M(k) = k + LN_h(f(k)) directly too
            gx = gk_norm if gx is None else gx + gk_norm
        if ctx.has_norm and gy is not None:
            gq = gy if gq is None else gq + gy  # the read's residual y = q + LN_h(f(q))
        need = ctx.needs_input_grad
        grads_state = [g if need[16 + i] else None for i, g in enumerate([*gw, *gs, *ganc])]
        coefficient_grads = (g_rbeta, g_rgamma, g_rc, gb_end, gg_end, ge_end, gc_end, g_tp)
        return (None, None, None, gq, gx, gv, *coefficient_grads, g_lnw, g_lnb, *grads_state)


def _step_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, read: str) -> list[Tensor]:
    """The eight coefficient inputs of `_FusedChunkStep` from gates `[..., n]` (any leading dims, so all full
    chunks of a call can be done in one batched call): read rows β̃, γ̃, C̃ (shifted one row for the strict read)
    and the chunk-end β_n, γ_n, E_n, C_{n,:}, θ⊙P_{n,:}."""
    beta, gamma, e, c, theta_p = chunk_coefficients(alpha, eta, theta)
    r_beta, r_gamma, r_c = read_rows(beta, gamma, c, read)
    return [r_beta, r_gamma, r_c, beta[..., -1], gamma[..., -1], e[..., -1], c[..., -1, :], theta_p]


def _apply_fused(
    q: Tensor, k: Tensor, v: Tensor, coefficients: Sequence[Tensor], weights: Sequence[Tensor],
    surprise: Sequence[Tensor], anchor: Sequence[Tensor], activation: str, clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:  # fmt: skip
    L = len(weights)
    ln = (None, None) if norm is None else (norm[0].unsqueeze(-2), norm[1].unsqueeze(-2))  # [H, 1, D]
    out = _FusedChunkStep.apply(activation, L, clip, q, k, v, *coefficients, *ln, *weights, *surprise, *anchor)
    return out[0], list(out[1 : 1 + L]), list(out[1 + L :])


def fused_chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor,
    eta: Tensor,
    theta: Tensor,
    weights: Sequence[Tensor],
    surprise: Sequence[Tensor],
    anchor: Sequence[Tensor],
    activation: str,
    read: str,
    clip: float = 0.0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """`naive.naive_chunk_step` with the hand-written backward of `_FusedChunkStep`; same inputs and results."""
    coefficients = _step_coefficients(alpha, eta, theta, read)
    return _apply_fused(q, k, v, coefficients, weights, surprise, anchor, activation, clip, norm)


# --- end fused chunk step ---


def torch_memory_update(
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
    checkpoint_chunks: int = 0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Chunked memory write + per-token reads (kernel "torch"): `_FusedChunkStep` per chunk, the coefficients of all
    full chunks in one batched call; same signature and result as `naive.naive_memory_update` and, with autograd
    through every step, `naive.naive_chunk_memory_update`.

    Chunk borders sit at multiples of `chunk_size` counted from the start of the sequence (`state.position`), so a
    call that begins or ends inside a chunk continues it exactly; a trailing partial chunk is written, never
    dropped (docs/design.md §11, titans-pytorch#59).

    Args:
        q, k, v: `[B, H, T, D]`.
        alpha, eta, theta: `[B, H, T]`.
        state: incoming `MemoryState`.
        chunk_size: b.
        activation: hidden activation of the memory MLP.
        read: "inclusive" or "strict".
        clip: c > 0 clamps each token's output error to [−c, c] (Huber inner loss, mlp.py); 0: Eq. 12 as written.
        checkpoint_chunks: G > 0 keeps only every G-th chunk state for backward and recomputes the rest (fused
            path, when gradients are enabled): training memory independent of length for ~1/3 more compute.
        norm: None, or (γ, β) `[H, D]` for M(x) = x + LN_h(f(x)) (`model.memory_norm = "ln"`, mlp.py).
    Returns:
        y `[B, H, T, D]` and the state after the last token.
    """
    return _fused_memory_update(
        q, k, v, alpha, eta, theta, state, chunk_size, activation, read, clip, checkpoint_chunks, norm
    )


def _group_coefficients(alpha: Tensor, eta: Tensor, theta: Tensor, sizes: Sequence[int], chunk_size: int,
                        read: str) -> list[list[Tensor]]:  # fmt: skip
    """`_step_coefficients` of consecutive chunks of `sizes` tokens from their gates `[B, H, Σ sizes]`. Only the first
    and the last chunk can be partial; the full chunks between them go through one batched call."""
    B, H = alpha.shape[:2]
    full = [i for i, n in enumerate(sizes) if n == chunk_size]
    coefs: list[list[Tensor] | None] = [None] * len(sizes)
    if len(full) > 1:
        i0, i1 = full[0], full[-1] + 1  # full chunks are contiguous
        s0 = sum(sizes[:i0])
        s1 = s0 + (i1 - i0) * chunk_size
        gates = [g[:, :, s0:s1].reshape(B, H, i1 - i0, chunk_size) for g in (alpha, eta, theta)]
        batched = [c.unbind(2) for c in _step_coefficients(*gates, read)]
        for j, i in enumerate(range(i0, i1)):
            coefs[i] = [c[j] for c in batched]
    parts = [g.split(list(sizes), dim=2) for g in (alpha, eta, theta)]
    return [c if c is not None else _step_coefficients(*(p[i] for p in parts), read) for i, c in enumerate(coefs)]


def _fused_memory_update(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, eta: Tensor, theta: Tensor, state: MemoryState,
    chunk_size: int, activation: str, read: str, clip: float = 0.0, checkpoint_chunks: int = 0,
    norm: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:  # fmt: skip
    """The chunk loop of `torch_memory_update` over `_FusedChunkStep`, in groups of `checkpoint_chunks` chunks
    (one group of all chunks when it is 0 or no gradient is recorded).

    Each group computes the coefficients of its chunks (`_group_coefficients`) and runs them in order; with
    checkpointing a group's activations, coefficients included, are recomputed in backward from its inputs and
    start state, so only one group's worth is alive at a time. Inputs are cut with `split` rather than slicing, so
    that their backward is one concatenation instead of a zero-filled full-size gradient per piece.
    """
    T = q.shape[2]
    weights, surprise, anchor = list(state.weights), list(state.surprise), list(state.anchor)
    pos = state.position
    sizes: list[int] = []
    done = 0
    while done < T:
        sizes.append(min(chunk_size - (pos + done) % chunk_size, T - done))
        done += sizes[-1]
    L = len(weights)
    group = checkpoint_chunks if (checkpoint_chunks > 0 and torch.is_grad_enabled()) else max(1, len(sizes))
    starts = list(range(0, len(sizes), group))
    spans = [sum(sizes[g : g + group]) for g in starts]
    pieces = [t.split(spans, dim=2) for t in (q, k, v, alpha, eta, theta)]

    def run(first: int, pos: int, *flat: Tensor) -> tuple[Tensor, ...]:
        """The chunks of the group starting at chunk `first`, from `flat` = weights, surprise, anchor, then the
        group's q, k, v, α, η, θ; returns its reads and the state after it."""
        w, sp, an = list(flat[:L]), list(flat[L : 2 * L]), list(flat[2 * L : 3 * L])
        sz = sizes[first : first + group]
        q_g, k_g, v_g, a_g, e_g, t_g = flat[3 * L :]
        coefs = _group_coefficients(a_g, e_g, t_g, sz, chunk_size, read)
        ys = []
        for n, q_i, k_i, v_i, c in zip(sz, q_g.split(sz, 2), k_g.split(sz, 2), v_g.split(sz, 2), coefs, strict=True):
            if pos % chunk_size == 0:
                an = w
            y, w, sp = _apply_fused(q_i, k_i, v_i, c, w, sp, an, activation, clip, norm)
            ys.append(y)
            pos += n
        return (torch.cat(ys, dim=2), *w, *sp, *an)

    outs: list[Tensor] = []
    for g, first in enumerate(starts):
        flat = [*weights, *surprise, *anchor, *(p[g] for p in pieces)]
        if len(starts) > 1:
            # Activation checkpointing (docs/performance.md): only the group's inputs and start state are saved.
            res = torch.utils.checkpoint.checkpoint(run, first, pos, *flat, use_reentrant=False)
        else:
            res = run(first, pos, *flat)
        outs.append(res[0])
        weights, surprise, anchor = list(res[1 : 1 + L]), list(res[1 + L : 1 + 2 * L]), list(res[1 + 2 * L :])
        pos += spans[g]
    if pos % chunk_size == 0:
        anchor = weights
    y = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    return y, MemoryState(tuple(weights), tuple(surprise), tuple(anchor), pos)
