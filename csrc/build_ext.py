"""Build description of the optional C++ extension ``fastft._C`` (loaded by setup.py).

``extensions()`` returns ``(ext_modules, cmdclass)`` for ``setuptools.setup``. The extension is
skipped -- and the install still succeeds, fastft then falls back to its PyTorch reference ops --
when ``FASTFT_BUILD_EXT=0``, when torch is not importable at build time (build with
``--no-build-isolation``), or when no working C++ compiler is found. A compile error in our own
sources is *not* swallowed: a broken kernel must fail the build loudly.

Flags: ``-O3`` with OpenMP; ``-ffp-contract=off`` because the kernels must reproduce PyTorch's
separate fp32 multiply and add bit for bit (quantize bytes and dequantized values are compared
exactly); never ``-ffast-math``. The AVX2 / AVX-512 paths are selected inside the sources with
``#pragma GCC target`` and chosen at run time from the CPU's features, so the wheel runs on any
x86-64 CPU. ``MAX_JOBS`` caps ninja's parallel compiles (default 2).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"fastft build: {msg}", file=sys.stderr)


def _compiler_works(cxx: str) -> bool:
    """True if ``cxx`` compiles and links a trivial OpenMP C++17 program."""
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run([cxx, "-std=c++17", "-fopenmp", src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def extensions():
    if os.environ.get("FASTFT_BUILD_EXT", "1").strip() == "0":
        _log("FASTFT_BUILD_EXT=0: skipping the C++ extension fastft._C")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _log("torch is not importable at build time (use --no-build-isolation); skipping fastft._C")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if not _compiler_works(cxx):
        _log(f"no working C++17/OpenMP compiler ({cxx!r}); skipping fastft._C, fastft will use its reference ops")
        return [], {}
    os.environ.setdefault("MAX_JOBS", "2")

    sources = sorted(glob.glob(os.path.join(HERE, "*.cpp")))
    # Relative paths keep the build reproducible and setuptools happy about sources outside the tree.
    root = os.path.dirname(HERE)
    sources = [os.path.relpath(s, root) for s in sources]
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG", "-Wall",
                 "-Wno-unknown-pragmas", "-Wno-sign-compare",
                 # GCC 12 false positive inside avx512fintrin.h's _mm512_undefined_* helpers
                 "-Wno-maybe-uninitialized", "-Wno-psabi"]
    ext = CppExtension(
        name="fastft._C",
        sources=sources,
        include_dirs=[HERE],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        depends=sorted(glob.glob(os.path.join(HERE, "*.h")) + glob.glob(os.path.join(HERE, "*.inc"))),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
