"""Each suite's ceilings: copy bandwidth and dense fp32 / bf16 matmul rates of its device, measured in
the same run as the kernels they judge."""
from __future__ import annotations

import torch

from . import common


def run(suite: str) -> list[dict]:
    if suite == "gpu" and not torch.cuda.is_available():
        return []
    return common.ceilings(common.device_for(suite).type)
