"""Ahead-of-time compilation of the 4-bit kernels (fastft/kernels/quant.py) for sm_80 and sm_90.

No GPU needed (tests/aot.py drives Triton's own ptxas / cuobjdump). Every quant-matmul config the
autotuner can pick (``quant.matmul_configs``, all kinds) compiles for both archs without register
spills, and the training tiles (BLOCK_M >= 64) use wgmma on sm_90; the fixed-heuristic row kernels
(quantize / dequantize) compile for every block size they accept. Each compile prints shared
memory, registers and spills (run with -s to see the table).
"""
import importlib
import sys

import pytest
import triton.language as tl

from tests.aot import compile_kernel, sass_loop, sass_ops

Q = importlib.import_module("fastft.kernels.quant")
ARCHS = [80, 90]


# Triton 3.9's interpreter patches triton.language for every interpreted call, and restores only
# what it patched through the kernel's own globals: a jit helper from another module (tl.cdiv,
# tl.zeros, ... whose globals name ``core``) re-patches ``triton.language.core`` and never undoes
# it. Compiling after interpreter tests in the same process then fails inside those helpers
# ("'block_argument' object has no attribute 'dtype'"). Test modules are imported at collection,
# before any test runs, so a snapshot taken here is pristine; it is put back before each compile.
def _lang_objects():
    mods = [m for n, m in list(sys.modules.items())
            if m is not None and (n == "triton.language" or n.startswith("triton.language."))]
    return mods + [tl.core.tensor, tl.core.dtype, tl.core.condition, tl.core.tensor_descriptor_base]


_PRISTINE = [(obj, dict(vars(obj))) for obj in _lang_objects()]


@pytest.fixture(autouse=True)
def _pristine_triton_language():
    for obj, saved in _PRISTINE:
        current = vars(obj)
        for name in [n for n in current if n not in saved]:
            try:
                delattr(obj, name)
            except (AttributeError, TypeError):
                pass
        for name, val in saved.items():
            if current.get(name, None) is not val:
                try:
                    setattr(obj, name, val)
                except (AttributeError, TypeError):  # read-only class attributes (__dict__, ...)
                    pass
    yield


def _report(what, r):
    print(f"sm_{r['arch']} {what}: shared={r['shared']} B, registers={r['registers']}, spills={r['spills']}, "
          f"wgmma={r['wgmma']}")


def _no_spills(r, what):
    if r["spills"] is None:
        pytest.fail(f"{what}: cannot read register use ({r['cuobjdump']})")
    assert r["spills"] == 0, f"{what}: {r['spills']} bytes spilled, {r['registers']} registers (sm_{r['arch']})"


def _mm_spec(kind, *, act=None, qtype=0, double_quant=True, symmetric=False, has_bias=True, split_k=None,
             has_lora=False):
    bwd = "bwd" in kind
    aligned = not kind.endswith("_general")
    act = act or ("*fp32" if kind.startswith("fp32_") else "*bf16")
    sig = {("dy_ptr" if bwd else "x_ptr"): act, "data_ptr": "*u8",
           "scale_ptr": "*u8" if (qtype == 0 and double_quant) else "*fp32",
           "aux_ptr": "*fp32", "auxmap_ptr": "*fp32", "qmap_ptr": "*fp32"}
    if not bwd:
        sig["bias_ptr"] = act
    sig[("dx_ptr" if bwd else "out_ptr")] = act if (bwd or split_k in (None, 1)) else "*fp32"
    if not bwd:
        sig.update({"u_ptr": act, "lb_ptr": act})
    sig.update({"M": "i32", "N": "i32", "K": "i32", ("stride_dym" if bwd else "stride_xm"): "i32",
                "offset": "fp32", "M_BUCKET": "i32"})
    if not bwd:
        sig.update({"R": "i32", "scaling": "fp32"})
    ce = dict(QTYPE=qtype, DOUBLE_QUANT=double_quant, SYMMETRIC=symmetric, ALIGNED=aligned, QBLOCK=128, NBS=256,
              INTERPRET=False, PRECISION="ieee" if act == "*fp32" else "tf32")
    if not bwd:
        ce.update(HAS_BIAS=has_bias and split_k in (None, 1),
                  SPLIT_K=split_k or (4 if "decode" in kind else 1),
                  HAS_LORA=has_lora and split_k in (None, 1), BLOCK_R=32)
    return (Q._quant_matmul_bwd_kernel if bwd else Q._quant_matmul_fwd_kernel), sig, ce


# fp32 activations (FMA dots) are no hot path: a few spilled bytes are tolerated there.
FP32_SPILL_LIMIT = 32


def _configs():
    for kind in ("fwd", "bwd", "fwd_general", "decode_general", "bwd_general", "fp32_fwd", "fp32_decode",
                 "fp32_bwd"):
        for cfg in Q.matmul_configs(kind):
            k = cfg.kwargs
            yield pytest.param(kind, cfg, id=f"{kind}-{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
                                               f"-w{cfg.num_warps}s{cfg.num_stages}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,cfg", list(_configs()))
def test_matmul_config_compiles(kind, cfg, arch):
    """NF4 double-quant, bf16 (fp32 for the fp32_* lists), bias: every config in every list."""
    kernel, sig, ce = _mm_spec(kind)
    r = compile_kernel(kernel, sig, {**ce, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages)
    what = f"quant_matmul {kind} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
    _report(what, r)
    if kind.startswith("fp32_"):
        assert r["spills"] is not None and r["spills"] <= FP32_SPILL_LIMIT, f"{what}: {r['spills']} bytes spilled"
        return
    _no_spills(r, what)
    if arch == 90 and cfg.kwargs["BLOCK_M"] >= 64:
        assert r["wgmma"], f"{what}: no wgmma on sm_90"


# The other flag combinations share the code paths above (fwd and bwd decode W tiles with the
# same helper); each is compiled once, on the hottest tile, alternating fwd / bwd.
VARIANTS = {
    "int4-asym-fp16": ("fwd", dict(act="*fp16", qtype=1, double_quant=False, symmetric=False)),
    "int4-sym-bf16": ("bwd", dict(qtype=1, double_quant=False, symmetric=True)),
    "int4-sym-bf16-nobias": ("fwd", dict(qtype=1, double_quant=False, symmetric=True, has_bias=False)),
    "nf4-fp16": ("bwd", dict(act="*fp16", double_quant=False)),
    "nf4dq-bf16-lora": ("fwd", dict(has_lora=True)),  # the LoRA epilogue
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matmul_variants_compile(variant, arch):
    kind, kw = VARIANTS[variant]
    # the hottest tile the variant may pick (the LoRA epilogue caps the tile: quant.LORA_MAX_TILE)
    cfg = next(c for c in Q.matmul_configs(kind)
               if not kw.get("has_lora") or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= Q.LORA_MAX_TILE)
    kernel, sig, ce = _mm_spec(kind, **kw)
    r = compile_kernel(kernel, sig, {**ce, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages)
    what = f"quant_matmul {kind} {variant} {cfg.kwargs}"
    _report(what, r)
    _no_spills(r, what)
    if arch == 90:
        assert r["wgmma"], f"{what}: no wgmma on sm_90"


# The aligned fp16 / bf16 decode kernel (M <= 16): NF4 (double quant or not), int4 both flavours,
# with and without the in-kernel split-K reduction, at the tile the launcher uses.
DECODE_VARIANTS = {
    "nf4dq-bf16-split": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=8),
    "nf4dq-bf16-nosplit": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=1),
    "nf4-fp16-split": dict(act="*fp16", qtype=0, double_quant=False, symmetric=False, split=8),
    "int4-bf16-split": dict(act="*bf16", qtype=1, double_quant=False, symmetric=False, split=8),
    "int4sym-fp16-split": dict(act="*fp16", qtype=1, double_quant=False, symmetric=True, split=8),
    "nf4dq-bf16-split-lora": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=8, has_lora=True),
    "nf4dq-bf16-nosplit-lora": dict(act="*bf16", qtype=0, double_quant=True, symmetric=False, split=1, has_lora=True),
    "nf4-bf16-bs32": dict(act="*bf16", qtype=0, double_quant=False, symmetric=False, split=8, qblock=32),
    "int4-fp16-g128": dict(act="*fp16", qtype=1, double_quant=False, symmetric=False, split=8, qblock=128),
}


def _decode_compile(arch, act, qtype, double_quant, symmetric, split, qblock=64, has_lora=False):
    sig = {"x_ptr": act + ":16", "data_ptr": "*u8:16",
           "scale_ptr": "*u8:16" if (qtype == 0 and double_quant) else "*fp32:16",
           "aux_ptr": "*fp32:16", "auxmap_ptr": "*fp32:16", "qmap_ptr": "*i32:16" if qtype == 0 else "*fp32:16",
           "bias_ptr": act + ":16", "out_ptr": act + ":16", "ws_ptr": "*fp32:16", "cnt_ptr": "*i32:16",
           "u_ptr": act + ":16", "lb_ptr": act + ":16",
           "M": "i32", "N": "i32:16", "K": "i32:16", "stride_xm": "i32:16", "offset": "fp32", "K_SPLIT": "i32:16",
           "R": "i32", "scaling": "fp32"}
    ce = dict(QTYPE=qtype, DOUBLE_QUANT=double_quant, SYMMETRIC=symmetric, QBLOCK=qblock, NBS=256, HAS_BIAS=True,
              SPLIT_K=split, HAS_LORA=has_lora, BLOCK_R=32, INTERPRET=False, BLOCK_M=Q.DECODE_MAX_M,
              BLOCK_N=Q.DECODE_BLOCK_N, BLOCK_K=min(Q.DECODE_BLOCK_K, qblock))
    return compile_kernel(Q._quant_decode_kernel, sig, ce, arch, Q.DECODE_WARPS, 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
def test_decode_kernel_compiles(variant, arch):
    r = _decode_compile(arch, **DECODE_VARIANTS[variant])
    what = f"quant_decode {variant}"
    _report(what, r)
    _no_spills(r, what)
    # Small enough for several programs per SM (the first H200 run's decode tile took 233).
    assert r["registers"] <= 128, f"{what}: {r['registers']} registers"


def test_decode_kernel_instruction_budget():
    """sm_90, NF4 + double quant, bf16: the K loop's instructions per weight element per thread.

    The version measured on the H200 (the training kernel with a 16-row tile, select-tree lookup,
    nibble interleave) spent 24 and ran at 46 us for 4096² at M = 1 (dense bf16: 19 us). This
    kernel's budget keeps it near its bytes: at most 10 (8.8 with Triton 3.9)."""
    r = _decode_compile(90, "*bf16", 0, True, False, 8)
    body = sass_loop(r)
    per_thread = Q.DECODE_BLOCK_N * Q.DECODE_BLOCK_K / (32 * Q.DECODE_WARPS)
    assert body, "no loop found in the SASS"
    assert len(body) / per_thread <= 10.0, f"{len(body)} loop instructions for {per_thread:.0f} weights per thread"
    assert not any(op.startswith("SEL") for op in body) or sum(op.startswith("SEL") for op in body) < 8, \
        "the select-tree lookup is back in the decode loop"


NF4_BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_row_kernels_compile(arch):
    """Quantize (+ double quant) and dequantize, for every blocksize (the launcher's ROWS heuristic
    gives one variant per blocksize); single-quant dequantize (a subset of the double-quant code)
    at the default blocksize."""
    for bs in NF4_BLOCKSIZES:
        rows = Q._rows_per_program(bs)
        r = compile_kernel(Q._nf4_quantize_kernel, {"w_ptr": "*bf16", "out_ptr": "*u8", "absmax_ptr": "*fp32",
                                                    "mids_ptr": "*fp32", "n": "i64", "nblocks": "i32"},
                           {"BS": bs, "ROWS": rows}, arch)
        _report(f"nf4_quantize bs={bs} rows={rows}", r)
        _no_spills(r, f"nf4_quantize bs={bs}")
        for dq in ((True, False) if bs == 64 else (True,)):  # dq=False only removes loads: one bs
            for out, word in ((2, "*i32:16"), (0, "*i64:16"), (3, "*fp64:16")):  # bf16, fp32, fp64
                for masked in ((False, True) if out == 2 else (False,)):
                    # ":16": aligned pointers and sizes, as Triton's launcher specializes them
                    r = compile_kernel(
                        Q._nf4_dequantize_kernel,
                        {"data_ptr": "*u8:16", "scale_ptr": "*u8:16" if dq else "*fp32:16", "aux_ptr": "*fp32:16",
                         "auxmap_ptr": "*fp32:16", "qmap_ptr": "*fp32:16", "out_ptr": word, "n": "i64:16",
                         "nblocks": "i32:16", "offset": "fp32", "first_blk": "i32:16"},
                        {"BS": bs, "NBS": 256, "DOUBLE_QUANT": dq, "ROWS": rows, "MASKED": masked, "OUT": out,
                         "INTERPRET": False}, arch, num_warps=Q.DEQUANT_WARPS)
                    what = f"nf4_dequantize bs={bs} dq={dq} out={out} masked={masked}"
                    _report(what, r)
                    _no_spills(r, what)
                    if out == 2 and not masked and bs == 64:
                        # The codes are one vector load and the outputs vector stores per thread
                        # (the first H200 run's version stored 2-byte values one at a time).
                        ops = sass_ops(r)
                        stores = [o for o in ops if o.startswith("STG")]
                        assert stores and all(o == "STG.E.128" for o in stores), f"{what}: stores {stores}"
                        assert "LDG.E.64" in ops, f"{what}: the 8 code bytes of a thread are not one load"
    r = compile_kernel(Q._dq8_quantize_kernel, {"absmax_ptr": "*fp32", "code_ptr": "*u8", "nested_ptr": "*fp32",
                                                "mids_ptr": "*fp64", "nblocks": "i32", "offset": "fp32"},
                       {"NBS": 256}, arch)
    _report("dq8_quantize", r)
    _no_spills(r, "dq8_quantize")


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_row_kernels_compile(arch):
    for g in (32, 64, 128):
        rows = Q._rows_per_program(g)
        for sym in (False, True):
            r = compile_kernel(Q._int4_quantize_kernel, {"w_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*fp32",
                                                         "zero_ptr": "*fp32", "N": "i32", "K": "i32"},
                               {"G": g, "SYMMETRIC": sym, "ROWS": rows}, arch, num_warps=Q.QUANTIZE_WARPS)
            _report(f"int4_quantize g={g} sym={sym}", r)
            _no_spills(r, f"int4_quantize g={g} sym={sym}")
            if sym and g != 128:
                continue  # symmetric dequantize = asymmetric minus one load: one group size
            r = compile_kernel(Q._int4_dequantize_kernel, {"data_ptr": "*u8", "scale_ptr": "*fp32",
                                                           "zero_ptr": "*fp32", "out_ptr": "*fp16", "N": "i32",
                                                           "K": "i32"},
                               {"G": g, "SYMMETRIC": sym, "ROWS": rows, "INTERPRET": False}, arch)
            _report(f"int4_dequantize g={g} sym={sym}", r)
            _no_spills(r, f"int4_dequantize g={g} sym={sym}")
