"""``fastft plan``: the per-device memory of a LoRA / QLoRA run before it starts.

For a model directory (its config.json) or a named shape ("8B", "70B", any ``fastft.models.SHAPES``
name) and a layout (N devices, DDP or FSDP2), it counts, per device:

* weights  -- frozen base tensors: embeddings, norms, LM head (in ``dtype``) and the linear layers
  (dense in ``dtype``, or NF4 codes: 4 bits per weight);
* scales   -- NF4 block scales (uint8 per block of 64 with double quantization, else fp32) plus the
  replicated code books and nested scales;
* lora     -- the adapters (fp32), ``grads`` (fp32, same size) and ``optimizer`` (AdamW: 2 x fp32);
* gather   -- FSDP only: the all-gathered (unsharded) tensors held during forward/backward: the
  root unit (embeddings, final norm, head; kept gathered through the step) and two layers (the
  current one and the prefetched next);
* activations -- saved for backward at ``seq_len`` x ``batch`` tokens, with and without gradient
  checkpointing (counted per saved tensor, see ``activation_bytes``).

Under FSDP2 each parameter is cut on dim 0 into N padded chunks, exactly as ``fully_shard`` does,
and the NF4 storage is laid out one row per quantization block (``ShardableNF4Linear``), so the
static parts are exact byte counts; ``tests/test_distributed.py`` checks them against the bytes the
ranks of a real run hold. Activations count the tensors the native Llama's blocks save (checked
against ``saved_tensors_hooks`` on the tiny model, fp32); on GPUs in bf16 a few of them (norm
statistics, log-sum-exp) are fp32, and allocator overhead, fragmentation and the CUDA context
(~0.5-1 GB) come on top. Host memory while loading is not in the table: under FSDP + QLoRA a rank
reads and quantizes only its own shard of the NF4 weights (docs/distributed.md), so it holds that
shard, one range being quantized and the embeddings / head, loaded whole until ``fully_shard``.
"""
from __future__ import annotations

import json
import math
import os

from .errors import UsageError

GB = 1e9

# meta-llama/Llama-3.1-70B's published config (numbers only).
_EXTRA_SHAPES = {
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False),
}
_ALIASES = {"8b": "llama-3.1-8b", "70b": "llama-3.1-70b", "3b": "llama-3.2-3b", "1b": "llama-3.2-1b"}


def load_shape(model: str) -> dict:
    """A model directory's config.json, or a named shape, as a dict of the fields the plan needs."""
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            raise UsageError(f"{model}: no config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        from fastft.models.synthetic import SHAPES

        name = _ALIASES.get(model.lower(), model.lower())
        shapes = {**SHAPES, **_EXTRA_SHAPES}
        if name not in shapes:
            raise UsageError(f"unknown model {model!r}: not a directory nor one of "
                             f"{', '.join(sorted(list(_ALIASES) + list(shapes)))}")
        cfg = dict(shapes[name])
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise UsageError(f"{model}: config lacks {missing} (fastft plan knows decoder-only Llama-style models)")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("tie_word_embeddings", False)
    return cfg


def _shard_bytes(rows: int, row_bytes: int, n: int, sharded: bool) -> int:
    """Bytes one rank holds of a (rows, ...) tensor: FSDP2 pads dim 0 to a multiple of N."""
    return (math.ceil(rows / n) if sharded else rows) * row_bytes


def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of the seven linear layers of one Llama block (all-linear LoRA targets)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def activation_bytes(cfg, tokens: int, checkpointing: bool, act_bytes: int = 2, r: int = 16) -> int:
    """Bytes autograd saves for ``tokens`` tokens (batch x seq_len) in fastft's native Llama.

    Counted from the tensors its blocks save (``tests/test_distributed.py`` measures them with
    ``saved_tensors_hooks``): per layer and token 5 hidden-size tensors (norm inputs and outputs,
    attention output), q and the attention output in q-size (2q), k and v (2kv), the MLP's gate, up
    and their product (3i), the seven LoRA branches' rank-r intermediates (7r) and the attention's
    log-sum-exp (one per head); once per token the final hidden state and RoPE's cos/sin. The loss
    is chunked (no (tokens, vocab) logits). With checkpointing each block keeps only its input (h),
    the final norm its input and output,
    and one block's full set exists while it is recomputed in backward.
    """
    h, i, nh, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["head_dim"]
    q, kv = nh * hd, cfg["num_key_value_heads"] * hd
    per_layer = (5 * h + 2 * q + 2 * kv + 3 * i + 7 * r + nh) * act_bytes
    layers = cfg["num_hidden_layers"]
    once = (h + 2 * hd) * act_bytes
    if checkpointing:
        # block inputs, plus the final norm's input and output outside the checkpointed blocks
        return tokens * (layers * h * act_bytes + h * act_bytes + once + per_layer)
    return tokens * (layers * per_layer + once)


def plan(model: str, *, method: str = "qlora", devices: int = 1, strategy: str | None = None, r: int = 16,
         dtype_bytes: int = 2, seq_len: int = 2048, batch: int = 1, blocksize: int = 64,
         double_quant: bool = True) -> dict:
    """Per-device bytes of each component (see the module docstring)."""
    if method not in ("lora", "qlora"):
        raise UsageError(f"method must be 'lora' or 'qlora', got {method!r}")
    if devices < 1:
        raise UsageError(f"devices must be >= 1, got {devices}")
    cfg = load_shape(model)
    strategy = strategy or ("fsdp" if method == "qlora" and devices > 1 else "ddp")
    if strategy not in ("ddp", "fsdp"):
        raise UsageError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    n, sh = devices, strategy == "fsdp" and devices > 1
    h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    weights = scales = lora = 0
    layer_full = 0  # one block's unsharded frozen + LoRA bytes (what FSDP gathers)
    for out_f, in_f in linear_shapes(cfg):
        if method == "qlora":
            nb = out_f * in_f // blocksize
            weights += L * _shard_bytes(nb, blocksize // 2, n, sh)
            scales += L * _shard_bytes(nb, 1 if double_quant else 4, n, sh)
            # replicated buffers: code books (+ nested scales: one fp32 per 256 blocks)
            scales += L * (16 * 4 + ((256 * 4 + 4 * math.ceil(nb / 256)) if double_quant else 0))
            layer_full += nb * (blocksize // 2 + (1 if double_quant else 4))
        else:
            weights += L * _shard_bytes(out_f, in_f * dtype_bytes, n, sh)
            layer_full += out_f * in_f * dtype_bytes
        lora += L * (_shard_bytes(r, in_f * 4, n, sh) + _shard_bytes(out_f, r * 4, n, sh))
        layer_full += 4 * r * (in_f + out_f)
    norms = L * 2 * _shard_bytes(h, dtype_bytes, n, sh) + _shard_bytes(h, dtype_bytes, n, sh)
    layer_full += 2 * h * dtype_bytes
    embed = _shard_bytes(V, h * dtype_bytes, n, sh) * (1 if cfg["tie_word_embeddings"] else 2)
    weights += norms + embed
    root_full = V * h * dtype_bytes * (1 if cfg["tie_word_embeddings"] else 2) + h * dtype_bytes
    gather = (root_full + 2 * layer_full) if sh else 0
    tokens = seq_len * batch
    out = {"model": model, "method": method, "devices": devices, "strategy": strategy if devices > 1 else "-", "r": r,
           "seq_len": seq_len, "batch": batch,
           "weights": weights, "scales": scales, "lora": lora, "grads": lora, "optimizer": 2 * lora,
           "gather": gather,
           "activations": activation_bytes(cfg, tokens, False, dtype_bytes, r),
           "activations_checkpointed": activation_bytes(cfg, tokens, True, dtype_bytes, r)}
    static = weights + scales + 4 * lora + gather
    out["total"] = static + out["activations"]
    out["total_checkpointed"] = static + out["activations_checkpointed"]
    return out


def format_table(rows: list[dict], capacities=(24, 80)) -> str:
    """A markdown table of plans (GB = 1e9 bytes), with whether each fits the given device sizes
    (with gradient checkpointing)."""
    head = ["model", "method", "devices", "strategy", "weights", "scales", "lora+grads+adam", "fsdp gather",
            "act", "act (ckpt)", "total", "total (ckpt)"] + [f"fits {c} GB" for c in capacities]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in rows:
        cells = [p["model"], p["method"], str(p["devices"]), p["strategy"]] + [
            f"{p[k] / GB:.2f}" for k in ("weights", "scales")] + [f"{(p['lora'] * 4) / GB:.2f}"] + [
            f"{p[k] / GB:.2f}" for k in ("gather", "activations", "activations_checkpointed", "total",
                                         "total_checkpointed")]
        cells += ["yes" if p["total_checkpointed"] <= c * GB * 0.9 else "no" for c in capacities]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["plan", "load_shape", "format_table", "activation_bytes"]
