"""Fused LoRA blocks in Triton: several LoRA projections of one input, forward and backward.

* ``lora_qkv``: q/k/v (or any 1-3 projections of one x). The down projections of all of them come from
  one pass over x (each with its own dropout mask, as separate PEFT modules have), the base GEMMs are
  one launch per projection, and dX = Σ_i dY_i W_i + drop_i'(du_i A_i) is one kernel.
* ``lora_gate_up_swiglu``: h = silu(g) ⊙ up with g, up two LoRA linears of the same x; one kernel
  (``_lora_swiglu_fwd_kernel``) computes both accumulators from each x tile and applies SwiGLU in
  the epilogue. Backward keeps the pre-activations g, up and recomputes silu (the activation itself
  is never stored): dg = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))), dup = dh ⊙ g σ(g)
  (``_swiglu_bwd_kernel``), then the two-projection LoRA backward.

The per-projection math, dropout, dtypes, tuning and limits are those of ``kernels/lora.py``, whose
multi-projection kernels (down projection, dA, dX; ``NUM_SEG`` = 2 or 3) these reuse. The fused
variants take dense weights only (quantized projections go through ``lora_linear`` one by one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Tuned, dot_flags, draw_seed, entry, grouped_pid, launch, mma
from .lora import (INTERPRET_CONFIG, backward, block_r, cast_inputs, check, down, even_k, fwd, gemm_configs, gemm_grid,
                   gemm_loop, load_k_tile, m_key, prune_gemm, rows2d, tile_origin)

__all__ = ["lora_qkv", "lora_gate_up_swiglu", "LoraMultiFunction", "LoraSwiGLUFunction", "SWIGLU"]


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _lora_swiglu_fwd_kernel(X, WG, WU, UG, UU, BG, BU, BIASG, BIASU, G, UP, H, M, N, K, RG, RU, stride_xm,
                            sg, su, M_KEY,
                            HAS_BIAS: tl.constexpr, STORE_GU: tl.constexpr, EVEN_K: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """h = silu(g) ⊙ up, g = x W_gᵀ + s_g u_g B_gᵀ (+ b_g), up = x W_uᵀ + s_u u_u B_uᵀ (+ b_u).

    Each x tile feeds both accumulators. STORE_GU writes the pre-activations g, up for backward,
    which recomputes σ(g) (``_swiglu_bwd_kernel``).
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    m0, n0, rows, cols, offs_m, offs_n = tile_origin(pid_m, pid_n, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                     EVEN_M=False, EVEN_N=False)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_off = rows[:, None] * stride_xm + offs_k[None, :]
    w_off = cols[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = Wᵀ tile
    Xt = X + m0 * stride_xm
    WGt = WG + n0 * K
    WUt = WU + n0 * K
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = load_k_tile(Xt + x_off, offs_k, K - k0, EVEN_K=EVEN_K, K_AXIS=1)
        wg = load_k_tile(WGt + w_off, offs_k, K - k0, EVEN_K=EVEN_K, K_AXIS=0)
        wu = load_k_tile(WUt + w_off, offs_k, K - k0, EVEN_K=EVEN_K, K_AXIS=0)
        acc_g = mma(x, wg, acc_g, UPCAST=UPCAST, PRECISION=PRECISION)
        acc_u = mma(x, wu, acc_u, UPCAST=UPCAST, PRECISION=PRECISION)
        Xt += BLOCK_K
        WGt += BLOCK_K
        WUt += BLOCK_K
    acc_g = gemm_loop(acc_g, UG + m0 * RG, BG + n0 * RG, rows, cols, RG, RG, 1, 1, RG, sg, BLOCK_K=BLOCK_R,
                      EVEN_K=False, SCALE_P=True, UPCAST=UPCAST, PRECISION=PRECISION)
    acc_u = gemm_loop(acc_u, UU + m0 * RU, BU + n0 * RU, rows, cols, RU, RU, 1, 1, RU, su, BLOCK_K=BLOCK_R,
                      EVEN_K=False, SCALE_P=True, UPCAST=UPCAST, PRECISION=PRECISION)
    if HAS_BIAS:
        acc_g += tl.load(BIASG + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(BIASU + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_GU:
        tl.store(G + out_off, acc_g.to(G.dtype.element_ty), mask=out_mask)
        tl.store(UP + out_off, acc_u.to(UP.dtype.element_ty), mask=out_mask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(H + out_off, h.to(H.dtype.element_ty), mask=out_mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, UP, DG, DUP, n, BLOCK: tl.constexpr):
    """dg = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))), dup = dh ⊙ g σ(g), in fp32 (σ recomputed from g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + offs, (dh * up * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dh * g * sig).to(DUP.dtype.element_ty), mask=mask)


SWIGLU = Tuned(_lora_swiglu_fwd_kernel, configs=lambda: gemm_configs(2), interpret=INTERPRET_CONFIG,
               key=["M_KEY", "N", "K", "RG", "RU", "HAS_BIAS", "STORE_GU"], prune=prune_gemm("M", "N", "X", 3),
               heuristics={"EVEN_K": even_k})
SWIGLU_BWD_BLOCK = 1024  # elementwise: a fixed block


# ----------------------------------------------------------------------------------- entry points
def _swiglu_fwd_fake(x2, Wg, Wu, ug, uu, Bg, Bu, bg, bu, sg, su, store):
    h = x2.new_empty((x2.shape[0], Bg.shape[0]))
    return [h, torch.empty_like(h), torch.empty_like(h)] if store else [h]


@entry("triton_lora_swiglu_fwd", fake=_swiglu_fwd_fake)
def swiglu_fwd(x2: torch.Tensor, Wg: torch.Tensor, Wu: torch.Tensor, ug: torch.Tensor, uu: torch.Tensor,
               Bg: torch.Tensor, Bu: torch.Tensor, bg: torch.Tensor | None, bu: torch.Tensor | None, sg: float,
               su: float, store: bool) -> list[torch.Tensor]:
    """[h] or, with ``store`` (for backward), [h, g, up]: h = silu(g) ⊙ up of the two LoRA linears."""
    M, K = x2.shape
    N = Bg.shape[0]
    h = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    g = torch.empty_like(h) if store else h
    up = torch.empty_like(h) if store else h
    rmax = max(ug.shape[1], uu.shape[1])
    SWIGLU[gemm_grid(M, N)](
        X=x2, WG=Wg, WU=Wu, UG=ug, UU=uu, BG=Bg, BU=Bu, BIASG=bg if bg is not None else Bg,
        BIASU=bu if bu is not None else Bu, G=g, UP=up, H=h, M=M, N=N, K=K, RG=ug.shape[1], RU=uu.shape[1],
        stride_xm=x2.stride(0), sg=sg, su=su, M_KEY=m_key(M),
        HAS_BIAS=bg is not None, STORE_GU=store, BLOCK_R=block_r(rmax), **dot_flags(x2.dtype))
    return [h, g, up] if store else [h]


def _swiglu_bwd_fake(dh2, g, up):
    return torch.empty_like(g), torch.empty_like(up)


@entry("triton_swiglu_bwd", fake=_swiglu_bwd_fake)
def swiglu_bwd(dh2: torch.Tensor, g: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, dup) of h = silu(g) ⊙ up, elementwise over contiguous tensors."""
    dg, dup = torch.empty_like(g), torch.empty_like(up)
    n = dh2.numel()
    launch(_swiglu_bwd_kernel, (triton.cdiv(n, SWIGLU_BWD_BLOCK),), dh2, g, up, dg, dup, n, BLOCK=SWIGLU_BWD_BLOCK)
    return dg, dup


# ------------------------------------------------------------------------------------- autograd
class LoraMultiFunction(torch.autograd.Function):
    """1-3 LoRA linears of one x (q/k/v): y_i = x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ) B_iᵀ.

    forward(ctx, x, n, scalings, dropout_p, seeds, *tensors) with tensors = W_0..W_{n-1},
    A_0.., B_0.., bias_0.. (bias entries may be None). Returns n outputs.
    """

    @staticmethod
    def forward(ctx, x, n, scalings, dropout_p, seeds, *tensors):
        Ws, As, Bs, bs = (list(tensors[i * n:(i + 1) * n]) for i in range(4))
        x2 = rows2d(x)
        us = down(x2, As, [int(t) for t in seeds], float(dropout_p))
        ys = [fwd(x2, W, u, B, b, s).view(*x.shape[:-1], B.shape[0])
              for W, u, B, b, s in zip(Ws, us, Bs, bs, scalings)]
        ctx.save_for_backward(x2, *Ws, *As, *Bs, *us)
        ctx.n, ctx.scalings, ctx.p, ctx.seeds, ctx.x_shape = n, scalings, dropout_p, seeds, x.shape
        ctx.has_bias = [b is not None for b in bs]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n = ctx.n
        saved = ctx.saved_tensors
        x2 = saved[0]
        Ws, As, Bs, us = (list(saved[1 + i * n:1 + (i + 1) * n]) for i in range(4))
        dys = [dy.reshape(-1, B.shape[0]).contiguous() if dy is not None
               else torch.zeros(x2.shape[0], B.shape[0], device=x2.device, dtype=x2.dtype)
               for dy, B in zip(dys, Bs)]
        nig = ctx.needs_input_grad[5:]
        need_W = any(nig[:n])
        dx, dWs, dAs, dBs = backward(dys, x2, Ws, As, Bs, us, ctx.scalings, ctx.p, ctx.seeds,
                                     ctx.needs_input_grad[0], need_W, any(nig[n:2 * n]), any(nig[2 * n:3 * n]))
        dbs = [dy.sum(0, dtype=torch.float32).to(dy.dtype) if hb else None for dy, hb in zip(dys, ctx.has_bias)]
        dWs = [g if nig[i] else None for i, g in enumerate(dWs)]
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, None, None, None, *dWs, *dAs, *dBs, *dbs)


class LoraSwiGLUFunction(torch.autograd.Function):
    """h = silu(g) ⊙ up with g, up LoRA linears of one x (gate/up projections of a SwiGLU MLP).

    forward(ctx, x, scalings, dropout_p, seeds, Wg, Wu, Ag, Au, Bg, Bu, bg, bu). Saves x, u_g, u_u and
    the pre-activations g, up; the activation is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, scalings, dropout_p, seeds, Wg, Wu, Ag, Au, Bg, Bu, bg, bu):
        x2 = rows2d(x)
        N = Bg.shape[0]
        ug, uu = down(x2, [Ag, Au], [int(t) for t in seeds], float(dropout_p))
        store = any(ctx.needs_input_grad)
        outs = swiglu_fwd(x2, Wg, Wu, ug, uu, Bg, Bu, bg, bu, float(scalings[0]), float(scalings[1]), store)
        h = outs[0]
        g, up = (outs[1], outs[2]) if store else (h, h)
        ctx.save_for_backward(x2, Wg, Wu, Ag, Au, Bg, Bu, ug, uu, g, up)
        ctx.scalings, ctx.p, ctx.seeds, ctx.x_shape = scalings, dropout_p, seeds, x.shape
        ctx.has_bias = bg is not None
        return h.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dh):
        x2, Wg, Wu, Ag, Au, Bg, Bu, ug, uu, g, up = ctx.saved_tensors
        N = Bg.shape[0]
        dh2 = dh.reshape(-1, N).contiguous()
        dg, dup = swiglu_bwd(dh2, g, up)
        nig = ctx.needs_input_grad
        dx, dWs, dAs, dBs = backward([dg, dup], x2, [Wg, Wu], [Ag, Au], [Bg, Bu], [ug, uu], ctx.scalings, ctx.p,
                                     ctx.seeds, nig[0], nig[4] or nig[5], nig[6] or nig[7], nig[8] or nig[9])
        dbg = dg.sum(0, dtype=torch.float32).to(dg.dtype) if ctx.has_bias else None
        dbu = dup.sum(0, dtype=torch.float32).to(dup.dtype) if ctx.has_bias else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, None, None, dWs[0] if nig[4] else None, dWs[1] if nig[5] else None, *dAs, *dBs, dbg, dbu)


# ------------------------------------------------------------------------------------- public
def _branches(x, weights, As, Bs, biases, scalings):
    """The projections as torch compositions (an empty batch: nothing to launch, all gradients 0)."""
    return [F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s
            for W, A, B, b, s in zip(weights, As, Bs, biases, scalings)]


def lora_qkv(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """[x W_iᵀ + b_i + s_i (drop_i(x) A_iᵀ) B_iᵀ for i] for 1-3 dense projections of one x.

    Each projection draws its own dropout seed (in order), as separate PEFT modules would.
    """
    n = len(weights)
    if not 1 <= n <= 3 or len(lora_As) != n or len(lora_Bs) != n:
        raise ValueError(f"lora_qkv: expected 1-3 projections with matching weights/A/B lists, got "
                         f"{len(weights)}, {len(lora_As)}, {len(lora_Bs)}")
    biases = [None] * n if biases is None else list(biases)
    scalings = [float(scalings)] * n if isinstance(scalings, (int, float)) else [float(s) for s in scalings]
    if len(biases) != n or len(scalings) != n:
        raise ValueError("lora_qkv: biases and scalings must have one entry per projection")
    dropout_p = float(dropout_p)
    if not all(isinstance(W, torch.Tensor) for W in weights):
        raise TypeError("lora_qkv: quantized weights are not fused; call lora_linear per projection")
    check(x, weights, lora_As, lora_Bs, biases, dropout_p, name="lora_qkv")
    x, weights, As, Bs, biases = cast_inputs(x, list(weights), list(lora_As), list(lora_Bs), biases)
    if x.numel() == 0:
        return _branches(x, weights, As, Bs, biases, scalings)
    seeds = [draw_seed(generator) if dropout_p > 0 else 0 for _ in range(n)]
    with torch.autocast(x.device.type, enabled=False):
        return list(LoraMultiFunction.apply(x, n, scalings, dropout_p, seeds, *weights, *As, *Bs, *biases))


def lora_gate_up_swiglu(x, weights, lora_As, lora_Bs, scalings, biases=None, dropout_p=0.0, generator=None):
    """silu(g) ⊙ up with g, up = LoRA linears (weights = [W_gate, W_up], etc.) of one x, fused."""
    if len(weights) != 2 or len(lora_As) != 2 or len(lora_Bs) != 2:
        raise ValueError("lora_gate_up_swiglu: expected two projections (gate, up)")
    biases = [None, None] if biases is None else list(biases)
    if (biases[0] is None) != (biases[1] is None):
        raise ValueError("lora_gate_up_swiglu: gate and up must both have a bias or neither")
    scalings = [float(scalings)] * 2 if isinstance(scalings, (int, float)) else [float(s) for s in scalings]
    dropout_p = float(dropout_p)
    if not all(isinstance(W, torch.Tensor) for W in weights):
        raise TypeError("lora_gate_up_swiglu: quantized weights are not fused; use lora_linear per projection")
    check(x, weights, lora_As, lora_Bs, biases, dropout_p, name="lora_gate_up_swiglu")
    if weights[0].shape != weights[1].shape:
        raise ValueError(f"lora_gate_up_swiglu: gate {tuple(weights[0].shape)} and up {tuple(weights[1].shape)} differ")
    x, weights, As, Bs, biases = cast_inputs(x, list(weights), list(lora_As), list(lora_Bs), biases)
    if x.numel() == 0:
        g, up = _branches(x, weights, As, Bs, biases, scalings)
        return F.silu(g) * up
    seeds = [draw_seed(generator) if dropout_p > 0 else 0 for _ in range(2)]
    with torch.autocast(x.device.type, enabled=False):
        return LoraSwiGLUFunction.apply(x, scalings, dropout_p, seeds, *weights, *As, *Bs, *biases)
