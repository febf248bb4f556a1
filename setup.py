"""fastft packaging.

`kernels/` ships as the subpackage `fastft.kernels` (never as a top-level `kernels`: that import name
belongs to another PyPI package, which bitsandbytes tries to import) and `benchmarks/` as
`fastft.benchmarks`, so `fastft bench` works from an installed package (the recorded rows under
benchmarks/results are not shipped). The optional C++ CPU extension
`fastft._C` is built from `csrc/` with torch's cpp_extension tooling; see csrc/README.md.
"""
import os

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["fastft", "fastft.*"])]
packages += ["fastft.kernels", "fastft.benchmarks"]

ext_modules, cmdclass = [], {}
if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build_ext.py")):
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_fastft_build_ext", os.path.join("csrc", "build_ext.py"))
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    ext_modules, cmdclass = _mod.extensions()

setup(
    name="fastft",
    version="0.1.0",
    description="Fast, memory-lean LoRA / QLoRA / full fine-tuning with Triton kernels",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastft.kernels": "kernels", "fastft.benchmarks": "benchmarks"},
    package_data={"fastft": ["data/*.jsonl", "data/*.txt"]},
    install_requires=[
        "torch>=2.11",
        "safetensors>=0.4",
        "transformers>=4.51",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "peft", "bitsandbytes", "gguf", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastft=fastft.cli:main"]},
)
