"""Security (issue 19, item 10): no pickle by default, no remote code, paths from files cannot
escape their directory, files are created with the user's normal permissions."""
from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "fastft").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            yield name, node


def test_no_pickle_and_no_remote_code_in_the_sources():
    bad = []
    for p in SOURCES:
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for m in mods):
                    bad.append(f"{p.name}:{node.lineno}: imports a pickle module")
        for name, call in _calls(tree):
            kws = {k.arg: k.value for k in call.keywords}
            if name == "load" and isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch":
                wo = kws.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{p.name}:{call.lineno}: torch.load without weights_only=True")
            tr = kws.get("trust_remote_code")
            if tr is not None and not (isinstance(tr, ast.Constant) and tr.value is False):
                bad.append(f"{p.name}:{call.lineno}: trust_remote_code not False")
    assert not bad, "\n".join(bad)


def test_shard_index_cannot_point_outside_the_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from fastft.errors import CheckpointError
    from fastft.models.loader import Checkpoint

    save_file({"w": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside.safetensors"):
        Checkpoint(str(d))


def test_shipped_data_names_cannot_escape():
    import fastft
    from fastft.errors import InputNotFoundError

    assert os.path.isfile(fastft.data.path("intents_train.jsonl"))
    for name in ("../cli.py", "/etc/passwd", "nope.jsonl"):
        with pytest.raises(InputNotFoundError):
            fastft.data.path(name)


def test_outputs_get_the_users_normal_permissions(tmp_path):
    import reliab_util as U
    from fastft.train import Trainer

    old = os.umask(0o022)
    try:
        Trainer(U.TinyLM(), U.dataset(), args=U.targs(tmp_path / "o", max_steps=1)).train()
    finally:
        os.umask(old)
    for p in [tmp_path / "o", *(tmp_path / "o").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o755 if p.is_dir() else 0o644
        assert mode == want, f"{p}: {oct(mode)} (umask 022 gives {oct(want)})"
