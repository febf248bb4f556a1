"""File-system helpers shared by every writer (a leaf: imports only the standard library)."""
from __future__ import annotations

import os


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def user_mode(path: str) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions a plain ``open`` /
    ``mkdir`` would: temporary files and directories (mkstemp, mkdtemp, safetensors' writer) are
    created 0600 / 0700, which would otherwise survive the rename into place."""
    mask = _umask()
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
