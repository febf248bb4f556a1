"""Data files shipped with fastft (the demo's intent task), found from any working directory."""
from __future__ import annotations

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """Absolute path of a shipped data file, e.g. ``fastft.data.path("intents_train.jsonl")``."""
    p = os.path.join(DATA_DIR, os.path.basename(name))
    if os.path.basename(name) != name or not os.path.isfile(p):
        from ..errors import InputNotFoundError

        shipped = sorted(f for f in os.listdir(DATA_DIR) if f.endswith((".jsonl", ".txt")))
        raise InputNotFoundError(f"{name}: not a data file shipped with fastft (shipped: {', '.join(shipped)})")
    return p


__all__ = ["DATA_DIR", "path"]
