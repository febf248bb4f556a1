"""The GPU suite's own ceilings: copy bandwidth and dense fp32 / bf16 matmul rates, measured in the
same run as the kernels they judge (the CPU suite states its ceilings in bench_cpu)."""
from __future__ import annotations

import torch

from benchmarks import common


def run(suite: str) -> list[dict]:
    if suite != "gpu" or not torch.cuda.is_available():
        return []
    return common.ceilings("cuda")
