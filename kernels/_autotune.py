"""What the autotuner may run, for how long, and what it remembers across processes.

Triton's autotuner compiles and times every config that survives a kernel's pruning, once per
autotune key, in every new process. Three rules on top of it, applied by :func:`policy` to an
``@triton.autotune`` kernel (an ``Autotuner`` instance):

* **Configs never run on a GPU stay out by default.** A config marked with :func:`unvalidated`
  (TMA and software-pipelined attention variants, new LoRA tiles, ... -- code that compiles and was
  read in SASS but has not executed on a device) is dropped from the candidates unless
  ``FASTFT_UNVALIDATED_CONFIGS=1``. The autotuner *executes* every candidate, so an unvalidated
  config that faults would take the process down even if it would never be picked;
  benchmarks/gpu_check.sh turns the switch on in a separate process stage. At least one config
  always remains (the first, if every candidate is unvalidated).
* **Bounded tuning.** At most ``FASTFT_AUTOTUNE_MAX`` candidates (``cap``), and at most
  ``FASTFT_AUTOTUNE_BUDGET`` seconds (default 10) of compiling + timing per (kernel, key): once the
  budget is spent, the remaining candidates are not compiled (timed as infinite). The first
  candidate, the kernel's preferred config, always runs. So a first training step stalls for
  about a budget per kernel and shape bucket, not for every config's compile.
* **Picks persist.** The picked config of each key is written to
  ``$FASTFT_AUTOTUNE_CACHE`` (default ``~/.cache/fastft/autotune``; ``0`` / ``off`` disables) in one
  JSON file per kernel, device and versions (:func:`cache_file`: GPU name and compute capability,
  torch, Triton and fastft versions, and the policy switches), atomically (temp file +
  ``os.replace``, merged with what another process wrote meanwhile). A later process with the
  same key takes the pick without tuning. Keys are Triton's own (the kernel's ``key`` arguments --
  shapes bucketed to powers of two by the kernels -- plus argument dtypes).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import types

import torch
import triton

from ._common import env_nonnegative

try:  # the kernel toolkit (kernels/_common.py) holds the FASTFT_AUTOTUNE_MAX cap
    from ._common import autotune_max, cap
except ImportError:  # the layout before kernels/_common.py
    from ._tuning import autotune_max, cap

DEFAULT_BUDGET_S = 10.0
_MARK = "_fastft_unvalidated"


# ---------------------------------------------------------------------------------------- switches
def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {os.environ.get(name)!r}")


def unvalidated_allowed() -> bool:
    """``FASTFT_UNVALIDATED_CONFIGS=1``: also run configs that have never executed on a GPU."""
    return _flag("FASTFT_UNVALIDATED_CONFIGS")


def budget_s() -> float:
    """Seconds of autotuning per (kernel, key); ``FASTFT_AUTOTUNE_BUDGET`` (0 = unbounded)."""
    return env_nonnegative("FASTFT_AUTOTUNE_BUDGET", DEFAULT_BUDGET_S, float, "a number of seconds >= 0")


def cache_dir() -> str | None:
    raw = os.environ.get("FASTFT_AUTOTUNE_CACHE")
    if raw is not None and raw.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    return raw or os.path.join(os.path.expanduser("~"), ".cache", "fastft", "autotune")


# -------------------------------------------------------------------------------- unvalidated marks
def unvalidated(config, why: str):
    """Mark a ``triton.Config`` as never run on a GPU (``why`` names the feature); returns it."""
    setattr(config, _MARK, why)
    return config


def is_unvalidated(config) -> bool:
    return bool(getattr(config, _MARK, None))


def admitted(configs: list) -> list:
    """The candidates without the unvalidated ones (all of them with the switch on); never empty
    when ``configs`` is not (the first one stays)."""
    configs = list(configs)
    if unvalidated_allowed():
        return configs
    return [c for c in configs if not is_unvalidated(c)] or configs[:1]


def gate(configs: list) -> list:
    """The candidates the autotuner may run: unvalidated ones only with the switch, then the cap.
    Never empty when ``configs`` is not."""
    return cap(admitted(configs))


# ------------------------------------------------------------------------------------- disk cache
def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:  # noqa: BLE001 - a missing dist-info must not break a kernel call
        return "unknown"


def device_key(device=None) -> str:
    """What a pick depends on besides the kernel and the shape: the device and the versions."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        dev = "interpreter"
    else:
        idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
        name = torch.cuda.get_device_name(idx)
        cc = "%d.%d" % torch.cuda.get_device_capability(idx)
        dev = f"{name}-sm{cc}"
    parts = [dev, f"torch{torch.__version__}", f"triton{triton.__version__}", f"fastft{_version('fastft')}",
             f"unvalidated{int(unvalidated_allowed())}", f"max{autotune_max()}"]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(parts))


def cache_file(kernel_name: str, device=None) -> str | None:
    d = cache_dir()
    if d is None:
        return None
    return os.path.join(d, f"{kernel_name}__{device_key(device)}.json")


def _describe(config) -> dict:
    return {"kwargs": {k: v for k, v in sorted(config.kwargs.items())}, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1),
            "maxnreg": getattr(config, "maxnreg", None)}


def _key_str(key) -> str:
    return json.dumps([k if isinstance(k, (int, float, str, bool)) or k is None else str(k) for k in key])


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # a damaged file is ignored, and rewritten by the next pick
        return {}
    return data.get("picks", {}) if isinstance(data, dict) else {}


def store(path: str, picks: dict) -> None:
    """Merge ``picks`` into the file at ``path`` (atomic replace; concurrent writers keep each
    other's keys, the last one wins on the same key)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    merged = {**load(path), **picks}
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"picks": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------- the policy
def policy(tuner, name: str | None = None):
    """Apply the three rules to ``tuner`` (an ``@triton.autotune`` kernel); returns it. Safe to call
    on anything else (returned unchanged)."""
    needed = ("prune_configs", "_bench", "run", "cache", "configs")
    if not all(hasattr(tuner, a) for a in needed) or getattr(tuner, "_fastft_policy", False):
        return tuner
    cls = type(tuner)
    kname = name or getattr(getattr(tuner, "base_fn", None), "__name__", None) or "kernel"
    state = {"t0": None, "spent": False, "loaded": None}

    def prune_configs(self, kwargs):
        state["t0"] = None
        state["spent"] = False
        return gate(cls.prune_configs(self, kwargs))

    def _bench(self, *args, config, **meta):
        limit = budget_s()
        now = time.perf_counter()
        if state["t0"] is None:
            state["t0"] = now  # the first candidate always runs
        elif limit and now - state["t0"] > limit:
            state["spent"] = True
            return [float("inf")] * 3
        return cls._bench(self, *args, config=config, **meta)

    def run(self, *args, **kwargs):
        path = cache_file(kname)
        if path is not None and state["loaded"] != path:
            state["loaded"] = path
            by_desc = {json.dumps(_describe(c), sort_keys=True): c for c in self.configs}
            for key_s, desc in load(path).items():
                c = by_desc.get(json.dumps(desc, sort_keys=True))
                if c is not None and (unvalidated_allowed() or not is_unvalidated(c)):
                    self.cache[tuple(json.loads(key_s))] = c
        before = set(self.cache)
        out = cls.run(self, *args, **kwargs)
        new = {k: self.cache[k] for k in self.cache if k not in before}
        if path is not None and new:
            try:
                store(path, {_key_str(k): _describe(c) for k, c in new.items()})
            except OSError:  # a read-only home must not fail the kernel call
                pass
        return out

    tuner.prune_configs = types.MethodType(prune_configs, tuner)
    tuner._bench = types.MethodType(_bench, tuner)
    tuner.run = types.MethodType(run, tuner)
    tuner._fastft_policy = True
    tuner._fastft_budget_state = state
    return tuner


__all__ = ["DEFAULT_BUDGET_S", "admitted", "budget_s", "cache_dir", "cache_file", "device_key", "gate", "is_unvalidated",
           "load", "policy", "store", "unvalidated", "unvalidated_allowed"]
