"""The layer map of docs/CONTRACTS.md, checked: ``kernels/`` (installed as ``fastft.kernels``) is a leaf.

Its modules import torch, triton, the standard library and each other, never ``fastft`` (nor the
repository's ``tests`` / ``benchmarks``): not at module level, not inside functions, not through
``importlib`` strings, not by relative imports that climb out of the package. The adapter that
connects them to fastft is ``fastft/ops/triton_backend.py``.
"""
import ast
import pathlib

import pytest

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"
FORBIDDEN = ("fastft", "tests", "benchmarks", "kernels")  # (``kernels`` is fastft.kernels: use relative imports)


def _imports(tree: ast.AST):
    """(line, imported module) for every import statement and importlib / __import__ string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                yield node.lineno, "." * node.level + (node.module or "")
            elif node.level == 0:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                yield node.lineno, str(node.args[0].value)


def _kernel_files():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 10, f"kernels/ has only {len(files)} modules: wrong path {KERNELS}?"
    return files


@pytest.mark.parametrize("path", _kernel_files(), ids=lambda p: p.name)
def test_kernel_module_imports_nothing_from_fastft(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, mod) for line, mod in _imports(tree)
           if mod.startswith("..") or mod.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.name} imports outside the kernels layer: {bad}"


def test_the_check_sees_lazy_and_importlib_imports():
    """The walker finds imports inside functions and importlib strings (so a pass means something)."""
    src = ("def f():\n    from fastft.ops import dispatch\n"
           "def g():\n    import importlib\n    return importlib.import_module('fastft.quant')\n"
           "from .. import ops\n")
    found = [mod for _, mod in _imports(ast.parse(src))]
    assert "fastft.ops" in found and "fastft.quant" in found and ".." in found


def test_kernel_files_stay_small():
    """One op per kernel file, none much over 800 lines (STYLE.md; docs/CONTRACTS.md's op index)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in _kernel_files()}
    assert max(sizes.values()) <= 850, sizes


def _jit_functions(trees):
    """{name: [parameter names, constexpr flags]} of every @triton.jit function in the trees."""
    out = {}
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            if not any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue
            params = node.args.args
            out[node.name] = [(a.arg, a.annotation is not None and "constexpr" in ast.unparse(a.annotation))
                              for a in params]
    return out


def _positional_constexprs(trees: dict, jit: dict) -> list:
    bad = []
    for fname, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in jit):
                continue
            params = jit[node.func.id]
            for i, _ in enumerate(node.args):
                if i < len(params) and params[i][1] and params[i][0] != "dtype":
                    bad.append(f"{fname}:{node.lineno} {node.func.id}(... {params[i][0]} positional)")
    return bad


def test_constexpr_flags_passed_by_keyword():
    """At every call of a @triton.jit helper inside the kernels, constexpr parameters are passed by
    keyword (``MASK_N=True``, ``UPCAST=UPCAST``), never as positional runs of literals -- except a
    ``dtype`` argument (``cast(v, x.dtype, UPCAST=...)``)."""
    trees = {p.name: ast.parse(p.read_text(), filename=str(p)) for p in _kernel_files()}
    jit = _jit_functions(trees.values())
    assert {"mma", "cast", "fwd_block", "gemm_loop", "dequant_tile"} <= set(jit)
    bad = _positional_constexprs(trees, jit)
    assert not bad, "constexpr arguments passed positionally:\n" + "\n".join(bad)
    # the check finds a positional flag where there is one
    src = ("@triton.jit\ndef h(x, FLAG: tl.constexpr):\n    return x\n"
           "@triton.jit\ndef k(x):\n    h(x, True)\n    h(x, FLAG=True)\n")
    tree = ast.parse(src)
    assert _positional_constexprs({"t.py": tree}, _jit_functions([tree])) == ["t.py:6 h(... FLAG positional)"]
