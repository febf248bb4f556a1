"""Ahead-of-time compilation of the attention kernels for sm_80 (A100) and sm_90 (H100/H200).

No GPU needed: tests/aot.py lowers each kernel to a cubin with Triton's bundled ptxas and reads
shared memory, registers and spills (cuobjdump). Checked here, per kernel:

* hot configs (every config the autotuner can pick at head dims 64 and 128, bf16, causal) compile
  for both archs, fit the arch's shared memory, do not spill, and use ``wgmma`` on sm_90;
* the feature flags as training uses them (BERT: D = 64 with padding and dropout; Llama: GQA with
  padding at D = 128), head dims 32 and 256, varlen fp16 compile for sm_90 without spills; odd
  combinations (D = 40 / 80 with every flag, fp32 "ieee") compile and fit shared memory (spills
  printed). With FULL: both archs, every config, every head-dim bucket;
* (the decode / combine kernels: tests/test_aot_attention_decode.py).

Compiling is slow on a shared CPU (seconds per cubin), so the default run compiles the first config
of each hot list and samples the rest; ``FASTFT_AOT_ALL=1`` compiles every config of every list
for every head-dim bucket and both archs (~200 cubins, 15+ minutes): that sweep is how the config
lists and kernels/attention_configs.py's register model were calibrated.
"""
import os

import pytest

from fastft.kernels import attention as triton_attention
from fastft.kernels import attention_configs as configs
from tests.aot import compile_kernel, cuobjdump_path
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
KERNELS = {
    "fwd": (triton_attention._attn_fwd_kernel, configs.fwd_configs),
    "dq": (triton_attention._attn_bwd_dq_kernel, configs.dq_configs),
    "dkdv": (triton_attention._attn_bwd_dkdv_kernel, configs.dkdv_configs),
}
FULL = os.environ.get("FASTFT_AOT_ALL") == "1"


def signature(kernel, dtype: str, constexprs: dict, head_dim: int) -> dict:
    """Runtime parameter types as the launcher passes them (16-aligned where Triton would see it)."""
    aligned = head_dim % 16 == 0  # row strides D*H are multiples of 16 elements then
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in PTRS:
            sig[name] = f"*{dtype}:16"
        elif name in ("LSE", "DELTA", "OP", "LP"):
            sig[name] = "*fp32:16"
        elif name == "KPM":
            sig[name] = "*u8:16"
        elif name == "CU":
            sig[name] = "*i32:16"
        elif name.startswith("stride_"):
            sig[name] = "i32:16" if aligned else "i32"
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def constexprs(config, head_dim, dtype="bf16", causal=True, kpm=False, varlen=False, dropout=False,
               precision="ieee", group=1):
    """The launcher's constexprs on a GPU (no interpreter upcast; ``_common.matmul_precision``)."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_KPM=kpm, VARLEN=varlen,
                DROPOUT=dropout, UPCAST=False, PRECISION=precision, **config.kwargs)


def pickable(kind, head_dim, dtype="bf16", dropout=False, arch=None):
    """Configs the autotuner can choose for this head dim (after pruning) on ``arch``, GPU lists."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return configs.prune_configs(KERNELS[kind][1](), block_d, kind=kind,
                           elem_bytes=4 if dtype == "fp32" else 2, dropout=dropout, arch=arch)


def test_autotune_pruning():
    """The pruner the autotuners call: head-dim and length aware, never empty."""
    import torch

    q16, q32 = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    prune = configs.pruner("fwd")
    args = {"Q": q16, "T_BUCKET": 4096, "S_BUCKET": 4096}
    long = prune(configs.fwd_configs(), args, BLOCK_D=128, DROPOUT=False)
    assert long and all(configs.reg_estimate("fwd", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, 128, 2)
                        <= configs.REG_LIMIT["fwd"] for c in long)
    assert len(prune(configs.fwd_configs(), {**args, "Q": q32}, BLOCK_D=128, DROPOUT=False)) < len(long)
    assert len(prune(configs.fwd_configs(), args, BLOCK_D=128, DROPOUT=True)) < len(long)
    assert not any(c.kwargs["USE_TMA"] for c in long)  # TMA_OK not given: pointer loads only
    with_tma = prune(configs.fwd_configs(), args, BLOCK_D=128, DROPOUT=False, TMA_OK=True)
    assert any(c.kwargs["USE_TMA"] for c in with_tma)
    short = prune(configs.fwd_configs(), {**args, "T_BUCKET": 16}, BLOCK_D=128, DROPOUT=False)
    assert short and all(c.kwargs["BLOCK_M"] == 16 for c in short)
    for kind in KERNELS:  # something survives at every head dim
        for d in (16, 32, 64, 128, 256):
            assert configs.pruner(kind)(KERNELS[kind][1](), {"Q": q16, "T_BUCKET": 16, "S_BUCKET": 16}, BLOCK_D=d,
                                   DROPOUT=True)


def _compile(kind, config, head_dim, arch, dtype="bf16", **flags):
    kernel = KERNELS[kind][0]
    cx = constexprs(config, head_dim, dtype=dtype, **flags)
    if kind == "fwd":
        cx["SCALE_POS"] = True  # the launcher's value for every positive softmax scale
        cx["TMA_OK"] = arch >= 90  # what tma_eligible says for aligned tensors on that arch
    r = compile_kernel(kernel, signature(kernel, dtype, cx, head_dim), cx, arch, num_warps=config.num_warps,
                       num_stages=config.num_stages)
    print(f"{kind:5s} D={head_dim:3d} {dtype} sm_{arch} {config.kwargs} w{config.num_warps} s{config.num_stages} "
          f"flags={flags}: shared={r['shared']} regs={r['registers']} spills={r['spills']} wgmma={r['wgmma']}")
    assert r["shared"] <= SHARED_LIMIT[arch], f"{kind} {config}: {r['shared']} B shared > sm_{arch} limit"
    return r


def hot(kind, head_dim, arch=None):
    """Pickable configs whose MMAs are tall enough for Hopper's warpgroup MMA (64 rows per warpgroup):
    the ones long sequences run on. 16-row configs exist for short sequences only."""
    rows = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"  # dK/dV tiles put keys on the rows
    return [c for c in pickable(kind, head_dim, arch=arch) if c.kwargs[rows] >= 64]


def _hot_cases():
    cases = []
    for arch in (90, 80):
        for kind in KERNELS:
            for d in (64, 128):
                cfgs = hot(kind, d, arch)
                for i, c in enumerate(cfgs if FULL else cfgs[:1]):
                    cases.append(pytest.param(kind, d, i, arch, id=f"{kind}-D{d}-cfg{i}-{arch}"))
    return cases


@pytest.mark.parametrize("kind,head_dim,idx,arch", _hot_cases())
def test_hot_configs_compile_without_spills(kind, head_dim, idx, arch):
    config = hot(kind, head_dim, arch)[idx]
    r = _compile(kind, config, head_dim, arch)
    if cuobjdump_path() is None:
        pytest.fail("cuobjdump missing from triton/backends/nvidia/bin: cannot check spills")
    assert r["spills"] == 0, f"{kind} D={head_dim} {config} spills {r['spills']} bytes on sm_{arch}"
    assert r["wgmma"] == (arch == 90), f"{kind} {config}: wgmma={r['wgmma']} on sm_{arch}"


@pytest.mark.parametrize("entry", sorted(configs.PIPE_SM90), ids=lambda e: "x".join(map(str, e[:2])) +
                         f"-w{e[2]}s{e[3]}-{'tma' if e[4] else 'ptr'}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pipelined_forward_compiles_without_spills_sm90(entry, head_dim):
    """Every software-pipelined forward tile the pruner may pick (PIPE_SM90) compiles for sm_90
    without spills, with causal masking and key padding (the heaviest flags it is offered with;
    never with dropout), and uses wgmma."""
    bm, bn, w, st, tma = entry
    config = configs._cfg(bm, bn, w, st, USE_TMA=tma, PIPE=True)
    assert config.kwargs in [c.kwargs for c in pickable("fwd", head_dim, arch=90)] or head_dim > 128
    r = _compile("fwd", config, head_dim, 90, causal=True, kpm=True)
    assert r["spills"] == 0, f"pipelined fwd D={head_dim} {config} spills {r['spills']} B"
    assert r["wgmma"]


def _other_cases():
    # (kernel, head dim, flags, strict): strict cases are hot in real training and must not spill
    # (BERT MLM: D = 64, padding + dropout 0.1; Llama GQA: D = 128, groups of 4 with padding); the
    # rest (odd head dims with every flag at once, fp32) must compile and fit, spills are printed.
    cases = [
        ("fwd", 64, dict(kpm=True, dropout=True), True),
        ("dq", 64, dict(kpm=True, dropout=True), True),
        ("dkdv", 64, dict(kpm=True, dropout=True), True),
        ("dkdv", 128, dict(kpm=True, group=4), True),
        ("fwd", 256, {}, True), ("fwd", 32, {}, True),
        ("fwd", 64, dict(dtype="fp16", varlen=True), True),
        ("fwd", 80, dict(kpm=True, dropout=True, group=4), False),
        ("dq", 128, dict(varlen=True, dropout=True, causal=False), False),
        ("dkdv", 40, dict(kpm=True, dropout=True, group=8), False),
        ("fwd", 64, dict(dtype="fp32", precision="ieee"), False),
    ]
    if FULL:
        cases += [(k, d, {}, False) for k in KERNELS for d in (16, 32, 64, 128, 256)]
        cases += [(k, d, dict(dtype="fp32", precision="ieee"), False) for k in KERNELS for d in (64, 128)]
        cases += [(k, d, dict(dropout=True, kpm=True), False) for k in KERNELS for d in (64, 128)]
    out = []
    for kind, d, flags, strict in cases:
        cfgs = pickable(kind, d, flags.get("dtype", "bf16"), flags.get("dropout", False))
        for i, _ in enumerate(cfgs if FULL else cfgs[:1]):
            for arch in ((90, 80) if FULL else (90,)):
                name = "-".join(f"{k}={v}" for k, v in flags.items())
                out.append(pytest.param(kind, d, i, flags, strict, arch, id=f"{kind}-D{d}-cfg{i}-{name}-{arch}"))
    return out


@pytest.mark.parametrize("kind,head_dim,idx,flags,strict,arch", _other_cases())
def test_other_configs_compile(kind, head_dim, idx, flags, strict, arch):
    """Compiles and fits shared memory; strict (hot) variants also must not spill."""
    flags = dict(flags)
    dtype = flags.pop("dtype", "bf16")
    config = pickable(kind, head_dim, dtype, flags.get("dropout", False))[idx]
    r = _compile(kind, config, head_dim, arch, dtype=dtype, **flags)
    assert r["ptx"] and r["cubin"]
    if strict:
        # sm_80: ptxas sometimes caps these 8-warp kernels at 128 registers and reports an 8-byte
        # stack frame (one 64-bit slot); anything larger is a real spill.
        allowed = 0 if arch == 90 else 8
        assert r["spills"] <= allowed, f"{kind} D={head_dim} {flags} {config} spills {r['spills']} B on sm_{arch}"
