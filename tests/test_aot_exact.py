"""The bit-exact kernels round on a GPU exactly as under the interpreter (where the CPU tests check them).

NF4 / int4 quantize and double quant must reproduce bitsandbytes' / the reference's bytes, and the
dequantizers their values, bit for bit. Under the interpreter every fp32 operation is numpy's,
correctly rounded and never fused; compiled for a GPU, two things can round differently:

* approximate division, reciprocal, square root, exp2, log2 (``div.approx``, ``div.full``,
  ``rcp.approx``, ``sqrt.approx``, ``rsqrt.approx``, ``ex2.approx``, ``lg2.approx``): Triton's plain
  fp32 ``/`` lowers to ``div.full.f32``, so the kernels divide with ``tl.math.div_rn``
  (``div.rn.f32``, IEEE; in SASS an ``MUFU.RCP`` refined by ``FFMA`` steps to the correctly
  rounded quotient), and they use no exp / log;
* FP contraction: LLVM fuses a multiply feeding an add into ``fma.rn`` (one rounding where the
  reference does two), and ptxas may contract any ``mul.f32`` / ``add.f32`` that carries no
  rounding modifier. Launched with ``quant_pack.EXACT_LAUNCH`` (``enable_fp_fusion=False``) the PTX
  holds no ``fma`` and every fp32 multiply / add / subtract is ``.rn``, which ptxas may not fuse.

Checked on the PTX of every exact kernel compiled for sm_80 and sm_90 with those options, that the
check fails on a kernel compiled with Triton's default fusion, and that every launcher passes the
options (a launch spy under the interpreter).
"""
import re

import pytest
import torch

from fastft.kernels import quant_pack as P
from tests.aot import compile_kernel, pristine_triton_language  # noqa: F401 (fixture)

ARCHS = [80, 90]
APPROX = re.compile(r"\b(?:div\.approx|div\.full|rcp\.approx|sqrt\.approx|rsqrt\.approx|ex2\.approx|lg2\.approx|"
                    r"sin\.approx|cos\.approx|tanh\.approx)\S*")
FUSED = re.compile(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b")
CONTRACTIBLE = re.compile(r"\b(?:mul|add|sub)(?:\.ftz)?\.f(?:32|64)\b")  # no rounding modifier


def check_exact(r, what):
    ptx = r["ptx"]
    for pat, why in ((APPROX, "approximate operations"), (FUSED, "fused multiply-adds"),
                     (CONTRACTIBLE, "fp multiply / add / subtract without .rn (ptxas may fuse them)")):
        found = sorted(set(pat.findall(ptx)))
        assert not found, f"{what} (sm_{r['arch']}): {why} in the PTX: {found}"
    assert re.search(r"\b(?:mul|add|sub|div)\.rn\.f(?:32|64)\b", ptx), f"{what}: no fp arithmetic in the PTX?"


QUANTIZE_SIG = {"w_ptr": "*bf16", "out_ptr": "*u8", "absmax_ptr": "*fp32", "mids_ptr": "*fp32", "n": "i64",
                "nblocks": "i32"}
INT4_SIG = {"w_ptr": "*bf16", "data_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "N": "i32", "K": "i32"}


@pytest.mark.usefixtures("pristine_triton_language")
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_kernels_compile_exact(arch):
    for bs in (64, 4096):
        r = compile_kernel(P._nf4_quantize_kernel, QUANTIZE_SIG, {"BS": bs, "ROWS": P.rows_per_program(bs)}, arch,
                           **P.EXACT_LAUNCH)
        check_exact(r, f"nf4_quantize bs={bs}")
    r = compile_kernel(P._nf4_quantize_kernel, {**QUANTIZE_SIG, "w_ptr": "*fp32"}, {"BS": 64, "ROWS": 64}, arch,
                       **P.EXACT_LAUNCH)
    check_exact(r, "nf4_quantize fp32 input")
    r = compile_kernel(P._dq8_quantize_kernel, {"absmax_ptr": "*fp32", "code_ptr": "*u8", "nested_ptr": "*fp32",
                                                "mids_ptr": "*fp64", "nblocks": "i32", "offset": "fp32"},
                       {"NBS": 256}, arch, **P.EXACT_LAUNCH)
    check_exact(r, "dq8_quantize")
    for g in (128,):
        for sym in (False, True):
            r = compile_kernel(P._int4_quantize_kernel, INT4_SIG, {"G": g, "SYMMETRIC": sym, "ROWS": P.rows_per_program(g)},
                               arch, num_warps=P.QUANTIZE_WARPS, **P.EXACT_LAUNCH)
            check_exact(r, f"int4_quantize g={g} sym={sym}")


@pytest.mark.usefixtures("pristine_triton_language")
@pytest.mark.parametrize("arch", ARCHS)
def test_dequantize_kernels_compile_exact(arch):
    """The double-quant scale (code value x nested absmax + offset) and each value (lut x scale, or
    (q - zero) x scale) are a multiply then an add, as in the reference: never one fma."""
    sig = {"data_ptr": "*u8", "scale_ptr": "*u8", "aux_ptr": "*fp32", "auxmap_ptr": "*fp32", "qmap_ptr": "*fp32",
           "n": "i64", "nblocks": "i32", "offset": "fp32", "first_blk": "i32"}
    for out, word in ((0, "*i64"), (2, "*i32"), (3, "*fp64")):
        for dq in ((True, False) if out == 0 else (True,)):
            r = compile_kernel(P._nf4_dequantize_kernel, {**sig, "out_ptr": word,
                                                          "scale_ptr": "*u8" if dq else "*fp32"},
                               {"BS": 64, "NBS": 256, "DOUBLE_QUANT": dq, "ROWS": 64, "MASKED": True, "OUT": out,
                                "UPCAST": False}, arch, num_warps=P.DEQUANT_WARPS, **P.EXACT_LAUNCH)
            check_exact(r, f"nf4_dequantize out={out} dq={dq}")
    for sym in (False, True):
        r = compile_kernel(P._int4_dequantize_kernel, {"data_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
                                                       "out_ptr": "*fp32", "N": "i32", "K": "i32"},
                           {"G": 128, "SYMMETRIC": sym, "ROWS": 8, "UPCAST": False}, arch, **P.EXACT_LAUNCH)
        check_exact(r, f"int4_dequantize sym={sym}")


@pytest.mark.usefixtures("pristine_triton_language")
def test_the_check_fails_without_the_exact_options():
    """Compiled with Triton's default fusion, the asymmetric int4 quantizer (its round-half-even step)
    and the double-quant dequantizer carry contractible multiply-adds: the check sees them."""
    r = compile_kernel(P._int4_quantize_kernel, INT4_SIG, {"G": 128, "SYMMETRIC": False, "ROWS": 8}, 90,
                       enable_fp_fusion=True)
    with pytest.raises(AssertionError, match="fused multiply-adds|without .rn"):
        check_exact(r, "int4_quantize with fusion")
    assert "div.full" in compile_kernel(_plain_div, {"x_ptr": "*fp32"}, {}, 90)["ptx"]  # what '/' would be


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _plain_div(x_ptr):
    x = tl.load(x_ptr)
    tl.store(x_ptr, 1.0 / x)


def _kernel_name(kernel) -> str:
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__


def test_launchers_pass_the_exact_options(monkeypatch, device):
    """Every launch of an exact kernel carries EXACT_LAUNCH (the spy sees the options before the
    interpreter drops them)."""
    from fastft.ops import dispatch
    from fastft.quant import Int4Weight, NF4Weight

    seen = []
    real = P.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((_kernel_name(kernel), kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(P, "launch", spy)
    w = torch.randn(40, 128, device=device)
    q = dispatch.impl("nf4_quantize", "triton")(w, 64, True)
    dispatch.impl("nf4_dequantize", "triton")(q, torch.float32)
    qi = dispatch.impl("int4_quantize", "triton")(w, 64, False)
    dispatch.impl("int4_dequantize", "triton")(qi, torch.float32)
    assert isinstance(q, NF4Weight) and isinstance(qi, Int4Weight)
    names = {n for n, _ in seen}
    assert {"_nf4_quantize_kernel", "_dq8_quantize_kernel", "_nf4_dequantize_kernel", "_int4_quantize_kernel",
            "_int4_dequantize_kernel"} <= names, names
    for n, kw in seen:
        for opt, val in P.EXACT_LAUNCH.items():
            assert kw.get(opt) == val, f"{n} launched without {opt}={val}: {kw}"
