"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``compile_kernel`` lowers a ``@triton.jit`` kernel for a given CUDA arch (80 = Ampere, 90 = Hopper)
all the way to a cubin with the ptxas that ships inside Triton, and reports what a kernel author
wants to know before owning a GPU (DESIGN.md "Checking kernels without a GPU"):

* ``shared``    shared memory per program in bytes (``metadata.shared``);
* ``registers`` registers per thread and ``spills`` bytes of local-memory stack per thread, both
                from ``cuobjdump -res-usage`` on the cubin (REG / STACK; ``spills`` also counts
                LOCAL). ``None`` when cuobjdump is not found (Triton's ``backends/nvidia/bin/``, then
                ``$PATH``) -- the ``cuobjdump`` key then says why;
* ``wgmma``     whether the PTX uses Hopper's warpgroup MMA (``wgmma.mma_async``);
* ``ptx``       the PTX text (and ``cubin`` bytes, ``name``, ``num_warps``, ``num_stages``).

Works on kernels decorated while ``TRITON_INTERPRET=1`` was set (the test suite sets it before any
kernel import): Triton then returns an ``InterpretedFunction`` that cannot be lowered, so the Python
function is rewrapped in a ``JITFunction``, and for the duration of the compile every interpreted
``@triton.jit`` function it can reach (its module's helpers and ``triton.language``'s own, such as
``tl.zeros``) is swapped for a compilable one, then restored.
Autotuner / heuristics wrappers are unwrapped to the kernel they tune.

Tested against Triton 3.9; the signature / constexpr conventions of 3.6-3.9 (constexprs keyed by
name or by ``(index,)`` tuples, constexpr parameters listed in the signature or not) are bridged.

Usage::

    from tests.aot import compile_kernel
    r = compile_kernel(_my_kernel, {"X": "*fp16", "n": "i32"}, {"BLOCK": 128}, arch=90)
    assert r["spills"] == 0 and r["wgmma"]
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import triton
import triton.language  # noqa: F401 (snapshot below)

__all__ = ["assert_no_spills", "compile_kernel", "cuobjdump_path", "nvdisasm_path", "pristine_triton_language",
           "report", "sass_loop", "sass_ops", "unwrap_jit"]


# --------------------------------------------------------------------------------------- unwrapping
def _is_interpreted(obj) -> bool:
    return type(obj).__name__ == "InterpretedFunction"


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(obj, JITFunction)


def _jit_kwargs(interp) -> dict:
    # InterpretedFunction keeps the decorator's kwargs (version, do_not_specialize, noinline, ...).
    from triton.runtime.jit import JITFunction

    kw = dict(getattr(interp, "kwargs", {}) or {})
    try:
        accepted = set(inspect.signature(JITFunction.__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic Triton builds
        return {}
    return {k: v for k, v in kw.items() if k in accepted}


def _base_kernel(kernel):
    """Strip Autotuner / Heuristics wrappers (each keeps the wrapped kernel in ``.fn``)."""
    for _ in range(8):
        if _is_jit(kernel) or _is_interpreted(kernel):
            return kernel
        inner = getattr(kernel, "fn", None)
        if inner is None:
            break
        kernel = inner
    raise TypeError(f"compile_kernel: {kernel!r} is not a @triton.jit kernel")


def _interpreter_artifact(val) -> bool:
    fn = val.func if isinstance(val, functools.partial) else val
    code = getattr(fn, "__code__", None)
    return val is print or (code is not None and code.co_filename.endswith(os.path.join("runtime", "interpreter.py")))


def _leaked_patches() -> list:
    """(module dict, name, pristine value) for interpreter patches Triton forgot to undo.

    Triton 3.9's interpreter patches ``triton.language`` for every call of a @jit helper and undoes
    only the patches of the kernel's own run; a helper whose module imports ``triton.language.core``
    under another name (``triton.language.random``: ``tl.rand``) leaves ``triton.language.core``
    patched for good, and the code generator then fails with "'value' object has no attribute ...".
    Pristine values: the wrapped builtin a patch closes over, else the same name in
    ``triton.language`` (which re-exports core and is restored properly).
    """
    import triton.language as tl
    import triton.language.core as core

    fixes = []
    for name, val in list(vars(core).items()):
        member = (getattr(val, "__kwdefaults__", None) or {}).get("member")
        if member is not None and _interpreter_artifact(val):
            fixes.append((vars(core), name, member))
        elif _interpreter_artifact(val) and name in vars(tl) and not _interpreter_artifact(vars(tl)[name]):
            fixes.append((vars(core), name, vars(tl)[name]))
    return fixes


@contextlib.contextmanager
def _compilable(kernel):
    """Yield a JITFunction for ``kernel``; interpreted jit functions are swapped out meanwhile.

    Under TRITON_INTERPRET=1 every ``@triton.jit`` function -- the kernel, its helpers and Triton's
    own library functions such as ``tl.zeros`` or ``tl.max`` -- is an InterpretedFunction, which the
    code generator cannot lower (worse: calling one leaves triton.language patched for the
    interpreter). While compiling, every InterpretedFunction in the kernel's globals (transitively)
    and in ``triton.language.*`` is replaced by a JITFunction of the same Python function; the
    originals are put back afterwards, so interpreter runs in the same process are unaffected.
    Not thread-safe (nor is anything else in the interpreter).
    """
    try:
        from triton import knobs  # Triton >= 3.4; older releases read TRITON_INTERPRET directly
    except ImportError:  # pragma: no cover
        knobs = None
    from triton.runtime.jit import JITFunction

    kernel = _base_kernel(kernel)
    if _is_jit(kernel):
        yield kernel
        return
    memo: dict = {}
    undo: list = []
    todo = [vars(m) for name, m in list(sys.modules.items())
            if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    seen: set = set()

    def convert(interp):
        if id(interp.fn) not in memo:
            memo[id(interp.fn)] = JITFunction(interp.fn, **_jit_kwargs(interp))
            todo.append(interp.fn.__globals__)
        return memo[id(interp.fn)]

    jit_kernel = convert(kernel)
    old_interp = knobs.runtime.interpret if knobs is not None else None
    try:
        for scope, name, pristine in _leaked_patches():
            undo.append((scope, name, scope[name]))
            scope[name] = pristine
        while todo:
            scope = todo.pop()
            if id(scope) in seen:
                continue
            seen.add(id(scope))
            for name, val in list(scope.items()):
                if _is_interpreted(val):
                    undo.append((scope, name, val))
                    scope[name] = convert(val)
        if knobs is not None:
            knobs.runtime.interpret = False  # constexpr_function results must be real constexprs
        yield jit_kernel
    finally:
        if knobs is not None:
            knobs.runtime.interpret = old_interp
        for scope, name, val in reversed(undo):
            scope[name] = val


def unwrap_jit(kernel):
    """The JITFunction behind an autotuned / heuristics / plain kernel. Kernels decorated under
    TRITON_INTERPRET=1 are not compilable on their own: ``compile_kernel`` handles those."""
    kernel = _base_kernel(kernel)
    if _is_interpreted(kernel):
        raise TypeError("unwrap_jit: kernel was decorated under TRITON_INTERPRET=1; use compile_kernel")
    return kernel


# ------------------------------------------------------------------------------------- compilation
def _make_source(fn, signature: dict, constexprs: dict):
    from triton.compiler import ASTSource

    # "*fp16:16" (triton.tools.compile's convention): the value is a multiple of 16 / the pointer is
    # 16-byte aligned, as Triton's launcher would specialize it at run time (vectorized loads).
    sig, div16 = {}, []
    for k, t in signature.items():
        t = str(t)
        if t.endswith(":16"):
            t = t[:-3]
            div16.append(k)
        sig[k] = t
    names = list(fn.arg_names)
    unknown = [k for k in list(sig) + list(constexprs) if k not in names]
    if unknown:
        raise ValueError(f"compile_kernel: {fn.__name__} has no parameter(s) {unknown}; parameters are {names}")
    missing = [n for n in names if n not in sig and n not in constexprs]
    if missing:
        raise ValueError(f"compile_kernel: {fn.__name__}: give a type or constexpr value for {missing}")
    # Triton >= 3.3 expects every parameter in the signature, constexprs typed "constexpr", in order.
    full_sig = {n: (sig[n] if n in sig else "constexpr") for n in names}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div16}
    by_index = {(names.index(k),): v for k, v in constexprs.items()}
    attempts = [
        lambda: ASTSource(fn=fn, signature=full_sig, constexprs=dict(constexprs), attrs=attrs),
        lambda: ASTSource(fn=fn, signature=full_sig, constexprs=by_index, attrs=attrs),
        lambda: ASTSource(fn=fn, signature={n: sig[n] for n in names if n in sig}, constexprs=by_index,
                          attrs=attrs),
    ]
    err = None
    for make in attempts:
        try:
            return make()
        except (TypeError, AssertionError, ValueError) as e:  # API shape of another Triton release
            err = e
    raise err


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch), 32)


@functools.lru_cache(maxsize=1)
def cuobjdump_path() -> str | None:
    """cuobjdump shipped with Triton (backends/nvidia/bin), else on $PATH, else None."""
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("cuobjdump")


@functools.lru_cache(maxsize=1)
def nvdisasm_path() -> str | None:
    """nvdisasm shipped with Triton (backends/nvidia/bin), else on $PATH, else None."""
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("nvdisasm")


def _sass_text(result: dict) -> str:
    exe = nvdisasm_path()
    if exe is None or not result.get("cubin"):
        raise RuntimeError("SASS: nvdisasm (triton backends/nvidia/bin or PATH) or the cubin is missing")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(result["cubin"])
        return subprocess.run([exe, "-c", path], capture_output=True, text=True, timeout=120).stdout


_INSTR_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def _opcode(instr: str) -> str:
    toks = instr.split()
    return toks[1] if toks[0].startswith("@") and len(toks) > 1 else toks[0]


def sass_ops(result: dict) -> list[str]:
    """The SASS opcodes (with modifiers, e.g. ``STG.E.128``; predicates dropped) of a
    ``compile_kernel`` result's cubin, in program order. Raises when nvdisasm is unavailable."""
    return [_opcode(m.group(1)) for m in map(_INSTR_RE.search, _sass_text(result).splitlines()) if m]


def sass_loop(result: dict) -> list[str]:
    """The opcodes of the largest loop body (a label up to a branch back to it) of the kernel."""
    lines = _sass_text(result).splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [_opcode(x.group(1)) for x in map(_INSTR_RE.search, lines[labels[m.group(1)]:i + 1]) if x]
            if len(body) > len(best):
                best = body
    return best


_RES_RE = re.compile(r"Function\s+(\S+)\s*:(.*)")


def _res_usage(cubin: bytes, name: str) -> tuple[int | None, int | None, str | None]:
    """(registers, spill bytes, error) of kernel ``name`` from ``cuobjdump -res-usage``."""
    exe = cuobjdump_path()
    if exe is None:
        return None, None, "cuobjdump not found (triton backends/nvidia/bin or PATH)"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([exe, "-res-usage", path], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, None, f"cuobjdump failed: {e}"
    text = out.stdout + out.stderr
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _RES_RE.search(line)
        if not m or (name not in m.group(1) and len(lines) > 2):
            continue
        # Older cuobjdump prints the counters on the next line.
        fields = m.group(2) if "REG" in m.group(2) else (lines[i + 1] if i + 1 < len(lines) else "")
        vals = dict(re.findall(r"(\w+):(\d+)", fields))
        if "REG" in vals:
            spills = int(vals.get("STACK", 0)) + int(vals.get("LOCAL", 0))
            return int(vals["REG"]), spills, None
    return None, None, f"could not parse cuobjdump output: {text.strip()[:300]!r}"


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3, **options) -> dict:
    """Compile ``kernel`` for ``sm_<arch>`` and report its resource use.

    ``signature`` maps each runtime parameter to a Triton type string ("*fp16", "*bf16", "*fp32",
    "*i32", "i32", "i64", "fp32", ...), optionally suffixed ":16" for a pointer that is 16-byte
    aligned / an integer that is a multiple of 16 (what Triton's launcher specializes on at run
    time, as in triton.tools.compile); ``constexprs`` maps every ``tl.constexpr`` parameter to its
    value. Returns a dict with ``shared`` (bytes), ``registers``, ``spills`` (bytes; None when
    cuobjdump is missing, see ``cuobjdump``), ``wgmma`` (bool), ``ptx`` (str), plus ``cubin``,
    ``name``, ``arch``, ``num_warps``, ``num_stages``. Further keyword arguments are compile options
    as a launch passes them (e.g. ``enable_fp_fusion=False``).
    """
    options = {"num_warps": int(num_warps), "num_stages": int(num_stages), **options}
    with _compilable(kernel) as fn:
        src = _make_source(fn, signature, constexprs)
        compiled = triton.compile(src, target=_target(arch), options=options)
    asm = compiled.asm
    ptx = asm["ptx"]
    cubin = asm.get("cubin")
    md = compiled.metadata
    shared = md.shared if hasattr(md, "shared") else md["shared"]
    name = md.name if hasattr(md, "name") else fn.__name__
    regs = spills = None
    err = "no cubin produced"
    if cubin:
        regs, spills, err = _res_usage(cubin, name)
    return {
        "name": name,
        "arch": int(arch),
        "num_warps": int(num_warps),
        "num_stages": int(num_stages),
        "shared": int(shared),
        "registers": regs,
        "spills": spills,
        "cuobjdump": err,  # None when registers/spills were read
        "wgmma": "wgmma" in ptx,
        "ptx": ptx,
        "cubin": cubin,
    }


# ---------------------------------------------------------------------------------- test fixture
# Triton 3.9's interpreter patches triton.language for every interpreted call, and restores only
# what it patched through the kernel's own globals: a jit helper from another module (tl.cdiv,
# tl.zeros, ... whose globals name ``core``) re-patches ``triton.language.core`` and never undoes
# it. Compiling after interpreter tests in the same process then fails inside those helpers
# ("'block_argument' object has no attribute 'dtype'"). This module is imported at collection,
# before any test runs, so the snapshot taken here is pristine; ``pristine_triton_language`` puts it
# back before each test that uses it (``pytestmark = pytest.mark.usefixtures(...)``).
def _lang_objects():
    import triton.language as tl

    mods = [m for n, m in list(sys.modules.items())
            if m is not None and (n == "triton.language" or n.startswith("triton.language."))]
    return mods + [tl.core.tensor, tl.core.dtype, tl.core.condition, tl.core.tensor_descriptor_base]


_PRISTINE = [(obj, dict(vars(obj))) for obj in _lang_objects()]


@pytest.fixture
def pristine_triton_language():
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


def report(what: str, r: dict) -> None:
    """One line per compile (run pytest with -s to see the table)."""
    print(f"sm_{r['arch']} {what}: shared={r['shared']} B, registers={r['registers']}, spills={r['spills']}, "
          f"wgmma={r['wgmma']}")


def assert_no_spills(r: dict, what: str) -> None:
    if r["spills"] is None:
        pytest.fail(f"{what}: cannot read register use ({r['cuobjdump']})")
    assert r["spills"] == 0, f"{what}: {r['spills']} bytes spilled, {r['registers']} registers (sm_{r['arch']})"
