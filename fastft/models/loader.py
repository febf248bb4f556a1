"""Load a Hugging Face checkpoint directory into a native fastft model, tensor by tensor.

Supported model types (``ARCHITECTURES``): llama, mistral, qwen2 (Llama family) and bert, roberta
(BERT family, incl. MiniLM). Checkpoint formats: ``model.safetensors``, sharded safetensors via
``model.safetensors.index.json``; ``pytorch_model.bin`` (and its shard index) only with
``allow_pickle=True``, read with ``torch.load(weights_only=True)``. Remote code is never run: the
config class comes from the table, not from ``auto_map``.

How it loads (gpt-fast style): the model is built on the meta device (no memory), the checkpoint
headers are matched against the model's explicit name table (``weight_table``; templates per layer
index) and every problem -- missing tensor, unexpected tensor, shape mismatch, truncated file --
is reported at once, naming key and file, before any tensor data is read. Then each tensor is
copied out of its memory-mapped file straight into its final dtype and device and assigned in
place of the meta parameter; with ``quantization`` the transformer blocks' linear weights become
``fastft.nn.QuantLinear`` as they are read, so the full-precision model never exists in memory.
Peak host memory is the final model plus one 16 MB copy chunk (measured ~1.09x the model on a
170 MB checkpoint, tests/test_loader.py); with quantization, plus one full-precision linear weight.
Inside a process group of N > 1 ranks, NF4 layers are left pending instead (``shard_quantization``):
each rank later reads and quantizes only its own FSDP shard (``fastft.nn.sharded_quant_linear``).
"""
from __future__ import annotations

from ..errors import ModelError, UsageError

import json
import os
import re

import torch
from torch import nn

from .safetensors_io import CheckpointError, SafetensorsFile

# model_type -> (family, transformers config class name)
ARCHITECTURES = {
    "llama": ("llama", "LlamaConfig"),
    "mistral": ("llama", "MistralConfig"),
    "qwen2": ("llama", "Qwen2Config"),
    "bert": ("bert", "BertConfig"),
    "roberta": ("bert", "RobertaConfig"),
}
QUANTIZATIONS = (None, "nf4", "int4")


def model_class(family: str):
    if family == "llama":
        from .llama import LlamaForCausalLM

        return LlamaForCausalLM
    from .bert import BertForMaskedLM

    return BertForMaskedLM


def load_config(path: str, task: str | None = None, labels=None, pooling: str | None = None):
    """(model class, transformers config) for the checkpoint directory ``path``.

    ``task`` ("classify" | "ner" | "embed", see ``heads.py``) picks a task head; without it a
    checkpoint saved with a task architecture (``BertForSequenceClassification``, ...) loads as
    that task. ``labels`` (names) sets the classifier's label set, ``pooling`` ("cls" | "mean")
    a sequence classifier's pooling."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse config ({e})") from e
    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if mt not in ARCHITECTURES:
        raise ModelError(
            f"{cfg_path}: model_type {mt!r} is not supported; supported model types: {', '.join(ARCHITECTURES)}"
        )
    family, cfg_name = ARCHITECTURES[mt]
    import transformers

    config = getattr(transformers, cfg_name).from_pretrained(path)
    archs = raw.get("architectures") or []
    if task is None:
        from .heads import ARCHITECTURE_TASKS

        task = ARCHITECTURE_TASKS.get(archs[0], (None, None))[1] if archs else None
        if task is None and family == "bert" and archs and archs[0] in ("BertModel", "RobertaModel") \
                and getattr(config, "fastft_task", None) == "embed":
            task = "embed"
    if labels is None and pooling is None and task is None:
        return model_class(family), config
    from .heads import POOLINGS, set_labels, task_class

    if task is None:
        raise ValueError("labels / pooling need a task ('classify', 'ner' or 'embed')")
    cls = task_class(family, task)
    if labels is not None:
        if task == "embed":
            raise ValueError("task 'embed' has no labels")
        set_labels(config, labels)
    if pooling is not None:
        if task != "classify" or family != "bert":
            raise ValueError(f"pooling applies to BERT-family sequence classification, not task {task!r}/{family}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        config.fastft_pooling = pooling
    config.fastft_task = task
    return cls, config


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------
class _PickleFile:
    """A ``pytorch_model*.bin`` read with ``torch.load(weights_only=True)`` (memory-mapped when possible)."""

    def __init__(self, path: str):
        self.path = path
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{path}: cannot load pickle checkpoint with weights_only=True ({e})") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self._sd = sd
        self.tensors = {k: _Info(k, v.dtype, tuple(v.shape), path) for k, v in sd.items()}

    def read(self, name, *, dtype=None, device=None):
        t = self._sd.pop(name)
        dt = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
        return t.to(device=device or "cpu", dtype=dt, copy=True)

    def close(self):
        self._sd = {}


class _Info:
    __slots__ = ("name", "dtype", "shape", "path")

    def __init__(self, name, dtype, shape, path):
        self.name, self.dtype, self.shape, self.path = name, dtype, shape, path


class Checkpoint:
    """All tensors of a checkpoint directory: ``infos`` (name -> header info) and ``read``."""

    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = path
        self.files = []
        self.duplicates = {}  # model tensor name -> further checkpoint keys holding it (match_checkpoint)
        self.infos = {}
        st_index = os.path.join(path, "model.safetensors.index.json")
        st_single = os.path.join(path, "model.safetensors")
        bin_index = os.path.join(path, "pytorch_model.bin.index.json")
        bin_single = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st_single):
            self._open([st_single], SafetensorsFile)
        elif os.path.isfile(st_index):
            self._open(self._shards(st_index), SafetensorsFile, index=st_index)
        elif os.path.isfile(bin_single) or os.path.isfile(bin_index):
            which = bin_single if os.path.isfile(bin_single) else bin_index
            if not allow_pickle:
                raise CheckpointError(
                    f"{which}: refusing to unpickle a .bin checkpoint (pickle can run arbitrary code); "
                    "convert it to safetensors or pass allow_pickle=True to read it with torch.load(weights_only=True)"
                )
            files = [bin_single] if os.path.isfile(bin_single) else self._shards(bin_index)
            self._open(files, _PickleFile, index=None if os.path.isfile(bin_single) else bin_index)
        else:
            found = sorted(os.listdir(path))
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (found: {found[:20]})"
            )

    def _shards(self, index_path):
        try:
            with open(index_path) as f:
                wm = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: cannot read the shard index ({e})") from e
        self._weight_map = wm
        files = []
        for fn in dict.fromkeys(wm.values()):
            full = os.path.join(self.path, fn)
            if os.path.basename(fn) != fn or not os.path.isfile(full):
                raise CheckpointError(f"{index_path}: shard {fn!r} listed in the index is missing")
            files.append(full)
        return files

    def _open(self, files, cls, index=None):
        for fp in files:
            f = cls(fp)
            self.files.append(f)
            for name, info in f.tensors.items():
                if name in self.infos:
                    raise CheckpointError(f"{fp}: tensor {name!r} also appears in {self.infos[name].path}")
                self.infos[name] = info
        self._owner = {name: f for f in self.files for name in f.tensors}
        if index is not None:
            for name, fn in self._weight_map.items():
                owner = self._owner.get(name)
                if owner is None or os.path.basename(owner.path) != fn:
                    raise CheckpointError(
                        f"{index}: tensor {name!r} is mapped to {fn!r} but that file does not contain it"
                    )

    def read(self, name, *, dtype=None, device=None) -> torch.Tensor:
        return self._owner[name].read(name, dtype=dtype, device=device)

    def where(self, name) -> str:
        return self._owner[name].path

    def float_dtype(self):
        """The floating dtype holding most of the checkpoint's elements (float32 if none)."""
        count = {}
        for i in self.infos.values():
            if i.dtype.is_floating_point:
                n = 1
                for s in i.shape:
                    n *= s
                count[i.dtype] = count.get(i.dtype, 0) + n
        return max(count, key=count.get) if count else torch.float32

    def close(self):
        for f in self.files:
            f.close()


# ----------------------------------------------------------------------------------------------
# Name matching
# ----------------------------------------------------------------------------------------------
def match_checkpoint(cls, config, ckpt: Checkpoint):
    """Map every table name to a checkpoint key, strictly.

    Returns ``(plan, missing_groups)``: ``plan`` maps model tensor name -> checkpoint key, and
    ``missing_groups`` names optional groups (e.g. an MLM head) absent from the checkpoint. Raises
    one CheckpointError listing every missing and unexpected key.
    """
    keys = set(ckpt.infos)
    prefix = cls.key_prefix(config)
    # A checkpoint of the bare base model (no head) stores keys without the base prefix.
    prefixed = not prefix or any(k.startswith(prefix) for k in keys)
    table = cls.weight_table(config)
    groups = cls.optional_groups(config)
    in_group = {n: g for g, names in groups.items() for n in names}

    def candidates(name):
        forms = (name,) + tuple(cls.checkpoint_aliases(name))
        if not prefixed:
            forms = tuple(f[len(prefix):] if f.startswith(prefix) else f for f in forms)
        return forms

    plan, missing = {}, []
    duplicates = ckpt.duplicates = {}
    for name in table:
        hit = [c for c in candidates(name) if c in keys]
        if len(hit) > 1:
            # The same tensor saved under two names (e.g. a shared head bias, which transformers needs
            # under both when the head is untied): fine if the copies agree, checked when read.
            if len({ckpt.infos[h].shape for h in hit}) > 1:
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} appears twice in the checkpoint with "
                                      f"different shapes, as {hit}")
            duplicates[name] = hit[1:]
        if hit:
            plan[name] = hit[0]
        else:
            missing.append(name)
    missing_groups = []
    for g, names in groups.items():
        absent = [n for n in names if n in missing]
        if absent and len(absent) == len(names):
            missing_groups.append(g)
            missing = [m for m in missing if m not in names]
    ignored = [re.compile(p) for p in cls.ignored_checkpoint_keys(config)]
    used = set(plan.values()) | {d for ds in duplicates.values() for d in ds}
    unexpected = sorted(k for k in keys - used if not any(p.fullmatch(k) for p in ignored))
    if missing or unexpected:
        lines = [f"{ckpt.path}: checkpoint does not match model_type {config.model_type!r} "
                 f"({config.num_hidden_layers} layers)"]
        if missing:
            hint = " (part of the optional group %r)" % in_group[missing[0]] if missing[0] in in_group else ""
            lines.append(f"  missing tensors ({len(missing)}): {missing[:10]}{hint}")
        if unexpected:
            lines.append(
                f"  unexpected tensors ({len(unexpected)}): "
                + ", ".join(f"{k!r} in {os.path.basename(ckpt.where(k))}" for k in unexpected[:10])
            )
        raise CheckpointError("\n".join(lines))
    return plan, missing_groups


def _check_shapes(model, plan, ckpt):
    bad = []
    for name, key in plan.items():
        want = tuple(model.get_parameter(name).shape)
        got = tuple(ckpt.infos[key].shape)
        if want != got:
            bad.append(f"{key!r} in {os.path.basename(ckpt.where(key))}: shape {got}, model expects {want}")
    if bad:
        raise CheckpointError(f"{ckpt.path}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:10]))


# ----------------------------------------------------------------------------------------------
# Materialisation
# ----------------------------------------------------------------------------------------------
def _set_param(model, name: str, tensor: torch.Tensor):
    mod_path, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_path)
    old = getattr(module, attr)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())


def _quant_kwargs(quantization, blocksize, double_quant, group_size):
    if quantization == "nf4":
        return {"blocksize": blocksize, "double_quant": double_quant}
    return {"group_size": group_size}


def from_pretrained(path, *, quantization=None, dtype=None, device=None, double_quant=True, blocksize=64,
                    group_size=128, allow_pickle=False, task=None, labels=None, pooling=None,
                    shard_quantization=None):
    """Load a native fastft model from a Hugging Face checkpoint directory (see module docstring).

    dtype: floating dtype of the loaded weights (None: the checkpoint's own, e.g. bf16 stays bf16).
    device: where the weights go (default CPU); tensors are moved one at a time.
    quantization: "nf4" (``blocksize``, ``double_quant``) or "int4" (``group_size``) for every linear
    layer inside the transformer blocks; embeddings, norms and the LM head stay in ``dtype``.
    task / labels / pooling: a task head instead of the LM head (``load_config``, ``heads.py``).
    shard_quantization: per-rank NF4 quantization for FSDP (``_shard_quantization_applies``): the NF4
    layers are built without reading their weights (``ShardableNF4Linear.pending``) and
    ``fastft.train.distributed.setup_fsdp`` quantizes only each rank's shard, read from its byte
    range of the safetensors file. None (default): on when ``quantization="nf4"`` inside an
    initialised process group of more than one rank and the checkpoint is unquantized safetensors;
    True: required (an error where it cannot apply); False: every rank quantizes every weight.
    """
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if shard_quantization not in (None, True, False):
        raise UsageError(f"shard_quantization must be None, True or False, got {shard_quantization!r}")
    if shard_quantization and quantization == "int4":
        raise UsageError("shard_quantization=True applies to NF4 layers, not quantization='int4'")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UsageError(f"unknown dtype {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating dtype, got {dtype}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    device = torch.device(device) if device is not None else torch.device("cpu")

    cls, config = load_config(path, task, labels, pooling)
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    try:
        with torch.device("meta"):
            model = cls(config)
        bnb = bnb_4bit_settings(config, path)
        prequant = {}
        if bnb is not None:
            if quantization == "int4":
                raise UsageError(f"{path}: the checkpoint is already NF4-quantized (bitsandbytes); "
                                 "load it with quantization=None or 'nf4', not 'int4'")
            prequant = _split_bnb_keys(ckpt)  # checkpoint module prefix -> its weight.* aux keys
        plan, missing_groups = match_checkpoint(cls, config, ckpt)
        preq_names = {n for n, k in plan.items() if k.endswith(".weight") and k[:-len(".weight")] in prequant}
        _check_shapes(model, {n: k for n, k in plan.items() if n not in preq_names}, ckpt)
        if prequant:  # every 4-bit layer's quant state and header, before any weight is read
            prequant = _check_bnb_layers(model, plan, preq_names, prequant, ckpt)
        dtype = dtype or ckpt.float_dtype()
        targets = set(cls.quant_targets(config)) if quantization and not prequant else set()
        if quantization == "int4":
            for t in sorted(targets):
                inf = model.get_submodule(t).in_features
                if inf % group_size:
                    raise ValueError(
                        f"int4 quantization: {t} has in_features={inf}, not a multiple of group_size={group_size}"
                    )
        if quantization:
            from fastft.nn import QuantLinear  # noqa: F401 - fail before reading any data if absent
        per_rank = _shard_quantization_applies(shard_quantization, quantization, ckpt, targets, prequant, model,
                                               blocksize, path)
        deferred = set(targets) if per_rank else set()

        # Biases before weights, so a quantized layer is built with its bias already in place.
        first = {}
        for n in plan:
            first.setdefault(n.rpartition(".")[0], len(first))
        order = sorted(plan, key=lambda n: (first[n.rpartition(".")[0]], n.endswith(".weight")))
        for name in order:
            key = plan[name]
            mod_path = name.rpartition(".")[0]
            if name in preq_names:
                aux = prequant[key[:-len(".weight")]]
                why = _pending_bnb_into(model, mod_path, ckpt, key, aux, device) if per_rank else "off"
                if why is None:
                    deferred.add(mod_path)
                    continue
                if shard_quantization and per_rank:
                    raise UsageError(f"{path}: shard_quantization=True cannot apply to {mod_path}: {why}")
                _load_bnb_into(model, mod_path, ckpt, key, aux, device)
                continue
            if mod_path in deferred and name.endswith(".weight") and name not in ckpt.duplicates:
                _pending_into(model, mod_path, ckpt, key, dtype, device, blocksize, double_quant)
                continue
            t = ckpt.read(key, dtype=dtype, device=device)
            for dup in ckpt.duplicates.get(name, ()):
                if not torch.equal(ckpt.read(dup, dtype=dtype, device=device), t):
                    raise CheckpointError(f"{ckpt.path}: {key!r} and {dup!r} both hold {name!r} but differ")
            if mod_path in targets and name.endswith(".weight"):
                _quantize_into(model, mod_path, t, quantization,
                               _quant_kwargs(quantization, blocksize, double_quant, group_size))
            else:
                _set_param(model, name, t)
            del t
        for g in missing_groups:
            model.init_missing(g, device, dtype)
        model.init_buffers(device)
        model.tie_weights()
    finally:
        ckpt.close()

    pending = tuple(m + "." for m in deferred)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta" and not n.startswith(pending)]
    if left:  # the table and the model disagree: a fastft bug, not a user error
        raise RuntimeError(f"fastft loader left tensors unmaterialised: {left[:10]}")
    model.eval()
    model.name_or_path = path  # adapters record their base (adapter_config.json base_model_name_or_path)
    model.source_path = os.path.abspath(path)  # the checkpoint directory (the forgetting report's base)
    return model


# ----------------------------------------------------------------------------------------------
# bitsandbytes 4-bit checkpoints (transformers' BitsAndBytesConfig(load_in_4bit=True) layout)
# ----------------------------------------------------------------------------------------------
BNB_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def bnb_4bit_settings(config, source) -> dict | None:
    """The ``quantization_config`` of a bitsandbytes NF4 checkpoint, None for an unquantized one;
    any other quantization method or mode raises, naming it."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ModelError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                         "(fastft reads bitsandbytes 4-bit NF4 checkpoints)")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise ModelError(f"{source}: only bitsandbytes 4-bit checkpoints are supported (load_in_4bit), "
                         f"got load_in_8bit={qc.get('load_in_8bit')}")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ModelError(f"{source}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type', 'fp4')!r} is not "
                         "supported (NF4 only)")
    return qc


def bnb_quantized_prefixes(keys) -> list[str]:
    """Module paths that carry a bitsandbytes NF4 weight (``<path>.weight.quant_state.bitsandbytes__nf4``)."""
    fp4 = [k for k in keys if k.endswith(".weight.quant_state.bitsandbytes__fp4")]
    if fp4:
        raise ModelError(f"{fp4[0]}: FP4 weights are not supported (NF4 only)")
    tail = ".weight." + BNB_AUX[-1]
    return sorted(k[:-len(tail)] for k in keys if k.endswith(tail))


def _split_bnb_keys(ckpt) -> dict[str, dict]:
    """Take the NF4 auxiliary tensors out of ``ckpt.infos`` (so name matching sees one ``weight`` per
    layer); returns {module prefix: {aux key: header info}}. A quant state of another kind (FP4, an
    unknown suffix) is refused here, naming its file and key."""
    for k in ckpt.infos:
        head, sep, kind = k.partition(".weight.quant_state.")
        if sep and kind != "bitsandbytes__nf4":
            why = ("FP4 weights are not supported: only NF4" if kind == "bitsandbytes__fp4" else
                   f"unknown quant state type {kind!r} (fastft reads bitsandbytes NF4: bitsandbytes__nf4)")
            raise CheckpointError(f"{ckpt.where(k)}: {k}: {why}")
    out = {}
    for prefix in bnb_quantized_prefixes(ckpt.infos):
        out[prefix] = {f"{prefix}.weight.{a}": ckpt.infos.pop(f"{prefix}.weight.{a}") for a in BNB_AUX
                       if f"{prefix}.weight.{a}" in ckpt.infos}
    return out


def _check_bnb_layers(model, plan, preq_names, prequant, ckpt) -> dict[str, dict]:
    """Check every pre-quantized layer before any weight is read: its quant state (JSON), the
    dtypes and sizes of its tensors against it, the layer's (out, in), and the values of the small
    tensors (finite scales, the NF4 code book). Reads only those small tensors, and returns them
    ({module prefix: {key: tensor}}) for ``_load_bnb_into``; the packed 4-bit data stays unread."""
    from fastft.quant.nf4 import BNB_QS_KEY, check_bnb_header, check_bnb_values

    small = {}
    for name in sorted(preq_names):
        key = plan[name]
        prefix = key[:-len(".weight")]
        mod_path = name.rpartition(".")[0]
        lin = model.get_submodule(mod_path)
        source = ckpt.where(key)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{source}: {key!r} is 4-bit quantized but {mod_path} is a "
                                  f"{type(lin).__name__}, not a linear layer")
        aux = prequant[prefix]
        infos = {key: (ckpt.infos[key].dtype, tuple(ckpt.infos[key].shape))}
        infos.update({k: (i.dtype, tuple(i.shape)) for k, i in aux.items()})
        qs_key = key + "." + BNB_QS_KEY
        tensors = {qs_key: ckpt.read(qs_key)} if qs_key in aux else {}
        meta = check_bnb_header(key, infos, tensors.get(qs_key), source, (lin.out_features, lin.in_features))
        tensors.update({k: ckpt.read(k) for k in aux if k != qs_key})
        check_bnb_values(key, tensors, meta, source)
        small[prefix] = tensors
    return small


def _load_bnb_into(model, mod_path, ckpt, weight_key, aux, device):
    from fastft.nn import QuantLinear
    from fastft.quant import NF4Weight

    parent_path, _, child = mod_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    lin = getattr(parent, child)
    prefix = weight_key[:-len("weight")]
    sd = {weight_key: ckpt.read(weight_key, device=device)}  # raw dtypes: no cast
    sd.update({k: v.to(device) for k, v in aux.items()})
    qw = NF4Weight.from_bnb_state_dict(sd, prefix, source=ckpt.where(weight_key),
                                       expected_shape=(lin.out_features, lin.in_features))
    bias = lin.bias if lin.bias is not None and lin.bias.device.type != "meta" else None
    if lin.bias is not None and bias is None:
        raise RuntimeError(f"fastft loader: bias of {mod_path} not loaded before its weight")
    setattr(parent, child, QuantLinear(qw, bias))


def _shard_quantization_applies(wanted, quantization, ckpt, targets, prequant, model, blocksize, path) -> bool:
    """Whether the NF4 layers are left pending for per-rank quantization / reading (``from_pretrained``'s
    ``shard_quantization``). It applies to safetensors checkpoints inside an initialised process
    group of more than one rank: an unquantized one loaded with quantization="nf4" when every target
    layer's element count is a multiple of ``blocksize`` (so shards hold whole blocks), or a
    bitsandbytes NF4 one (each rank then reads only its shard's codes and scales; checked per layer
    by ``_pending_bnb_into``)."""
    if wanted is False or quantization == "int4":
        return False
    import torch.distributed as dist

    from .safetensors_io import SafetensorsFile

    why = None
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        why = "no process group of more than one rank is initialised (start the workers with torchrun)"
    elif not (targets or prequant):
        why = "nothing is NF4 (an unquantized checkpoint loaded with quantization=None)"
    elif not all(isinstance(f, SafetensorsFile) for f in ckpt.files):
        why = "the checkpoint is pickle (.bin), which cannot be read by byte range; convert it to safetensors"
    else:
        for t in sorted(targets):
            lin = model.get_submodule(t)
            if (lin.in_features * lin.out_features) % blocksize:
                why = (f"{t} has {lin.in_features * lin.out_features} weight elements, not a multiple of "
                       f"blocksize={blocksize}")
                break
    if why is None:
        return True
    if wanted:
        raise UsageError(f"{path}: shard_quantization=True cannot apply: {why}")
    return False


class _RangeSource:
    """Elements [start, stop) of one checkpoint tensor, read by byte range (a pending NF4 layer's source)."""

    def __init__(self, file, key, dtype):
        self.file, self.key, self.dtype = file, key, dtype

    def read(self, start, stop, device):
        return self.file.read_range(self.key, start, stop, dtype=self.dtype, device=device)

    def close(self):
        self.file.close()  # unmaps; a later read maps the file again

    def __str__(self):
        return f"{self.key!r} in {self.file.path}"


class _BnbRangeSource:
    """The codes and block scales of one bitsandbytes NF4 weight, read by block range."""

    prequantized = True

    def __init__(self, ckpt, weight_key, absmax_key, blocksize):
        self.codes, self.absmax = ckpt._owner[weight_key], ckpt._owner[absmax_key]
        self.weight_key, self.absmax_key, self.blocksize = weight_key, absmax_key, blocksize

    def read_codes(self, b0, b1, device):
        """uint8 (b1 - b0, blocksize / 2): the packed codes of blocks [b0, b1)."""
        half = self.blocksize // 2
        return self.codes.read_range(self.weight_key, b0 * half, b1 * half, device=device).view(b1 - b0, half)

    def read_absmax(self, b0, b1, device):
        """The stored block scales of blocks [b0, b1) (uint8 with double quantization, else fp32)."""
        return self.absmax.read_range(self.absmax_key, b0, b1, device=device)

    def close(self):
        self.codes.close()
        self.absmax.close()

    def __str__(self):
        return f"{self.weight_key!r} in {self.codes.path}"


def _pending_bnb_into(model, mod_path, ckpt, weight_key, aux_keys, device):
    """A pending layer for one bitsandbytes NF4 weight (the small tensors -- code books, nested
    scales, quant state -- are read now; codes and block scales per rank later). Returns None, or
    why this layer cannot be read by block range."""
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear
    from fastft.quant import NF4Weight

    prefix = weight_key[:-len("weight")]
    absmax_key = weight_key + ".absmax"
    if ckpt.infos[weight_key].dtype != torch.uint8:
        return f"its codes are stored as {ckpt.infos[weight_key].dtype} (bitsandbytes quant_storage), not uint8"
    if absmax_key not in aux_keys:
        return "no absmax tensor"
    sd = {k: ckpt.read(k, device=device) for k in aux_keys if k != absmax_key}
    for k in (weight_key, absmax_key):  # shapes and dtypes only: validated, not read
        info = ckpt.infos.get(k) or ckpt._owner[k].tensors[k]
        sd[k] = torch.empty(info.shape, dtype=info.dtype, device="meta")
    qw = NF4Weight.from_bnb_state_dict(sd, prefix)
    parent_path, _, child = mod_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    lin = getattr(parent, child)
    if not isinstance(lin, nn.Linear):
        raise CheckpointError(f"{ckpt.path}: {weight_key!r} is 4-bit quantized but {mod_path} is a "
                              f"{type(lin).__name__}, not a linear layer")
    if tuple(qw.shape) != (lin.out_features, lin.in_features):
        raise CheckpointError(f"{ckpt.path}: {weight_key!r} holds shape {tuple(qw.shape)}, model expects "
                              f"{(lin.out_features, lin.in_features)}")
    if qw.numel % qw.blocksize:
        return f"{qw.numel} weight elements, not a multiple of its blocksize {qw.blocksize}"
    if lin.bias is not None and lin.bias.device.type == "meta":
        raise RuntimeError(f"fastft loader: bias of {mod_path} not loaded before its weight")
    layer = ShardableNF4Linear.pending(lin.in_features, lin.out_features,
                                       _BnbRangeSource(ckpt, weight_key, absmax_key, qw.blocksize), bias=lin.bias,
                                       blocksize=qw.blocksize, double_quant=qw.double_quant, dtype=qw.dtype,
                                       device=device)
    layer.quant_map, layer._offset = qw.quant_map, qw.offset
    if qw.double_quant:
        layer.nested_absmax, layer.nested_quant_map = qw.nested_absmax, qw.nested_quant_map
    setattr(parent, child, layer)
    return None


def _pending_into(model, mod_path, ckpt, key, dtype, device, blocksize, double_quant):
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear

    parent_path, _, child = mod_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    lin = getattr(parent, child)
    if lin.bias is not None and lin.bias.device.type == "meta":
        raise RuntimeError(f"fastft loader: bias of {mod_path} not loaded before its weight")
    setattr(parent, child, ShardableNF4Linear.pending(
        lin.in_features, lin.out_features, _RangeSource(ckpt._owner[key], key, dtype), bias=lin.bias,
        blocksize=blocksize, double_quant=double_quant, dtype=dtype, device=device))


def _quantize_into(model, mod_path, weight, quantization, kw):
    from fastft.nn import QuantLinear

    parent_path, _, child = mod_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    lin = getattr(parent, child)
    dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if lin.bias is not None:
        dense.bias = lin.bias
    q = QuantLinear.from_linear(dense, quantization=quantization, **kw)
    del dense
    setattr(parent, child, q)


def bnb_quantization_config(model) -> dict:
    """The ``quantization_config`` transformers + bitsandbytes need to load ``model``'s NF4 layers."""
    from fastft.nn import QuantLinear
    from fastft.quant import NF4Weight

    quant = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not quant:
        raise ValueError("save_quantized: the model has no quantized layers (load it with quantization='nf4')")
    bad = sorted({n for n, m in quant if not isinstance(m.weight, NF4Weight)})
    if bad:
        raise ValueError(f"save_quantized: bitsandbytes reads NF4 only; these layers are int4: {bad[:5]}")
    w = quant[0][1].weight
    if len({(m.weight.double_quant, m.weight.dtype) for _, m in quant}) != 1:
        raise ValueError("save_quantized: NF4 layers disagree on double_quant / dtype; bitsandbytes' config "
                         "holds one setting for the whole model")
    dense = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool(w.double_quant),
        "bnb_4bit_compute_dtype": str(w.dtype).replace("torch.", ""), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": dense or None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def save_quantized(model, out_dir) -> None:
    """Write ``model`` (native fastft or a patched transformers model) with its NF4 layers in
    bitsandbytes' layout (keys ``<path>.weight``, ``.weight.absmax``, ``.weight.quant_map``,
    ``.weight.nested_*``, ``.weight.quant_state.bitsandbytes__nf4``) plus a config.json whose
    ``quantization_config`` makes ``transformers.AutoModel*.from_pretrained`` rebuild them as
    bitsandbytes ``Linear4bit`` layers. Dense layers (embeddings, norms, the LM head) stay dense."""
    from fastft.nn import QuantLinear

    from .safetensors_io import save_safetensors_atomic

    out_dir = os.fspath(out_dir)
    qconfig = bnb_quantization_config(model)
    os.makedirs(out_dir, exist_ok=True)
    if hasattr(model, "weight_table"):  # native: the explicit name table, as save_pretrained writes it
        tensors = {}
        for name in model.weight_table(model.config):
            mod_path, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_path)
            if isinstance(mod, QuantLinear) and attr == "weight":
                tensors.update(mod.weight.to_bnb_state_dict(mod_path + "."))
            else:
                tensors[name] = model._tensor_for_save(name)
        for alias, src in model.tied_aliases().items():
            if alias.endswith(".bias") and src in tensors and alias not in tensors:
                tensors[alias] = tensors[src].clone()
        cfg = model.config.to_dict()
        cfg["architectures"] = [model.hf_architecture]
    else:  # a transformers model: its own state dict (QuantLinear writes bitsandbytes' keys)
        tensors, seen = {}, {}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        for k, v in model.state_dict().items():
            if k in tied:
                continue
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr in seen and v.numel():
                continue  # a tied tensor under a second name: transformers re-ties it on load
            seen[ptr] = k
            tensors[k] = v
        cfg = model.config.to_dict()
        cfg.pop("_attn_implementation", None)
        cfg.pop("_attn_implementation_internal", None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = qconfig["bnb_4bit_compute_dtype"]
    cfg["quantization_config"] = qconfig
    save_safetensors_atomic(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tmp = os.path.join(out_dir, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "config.json"))
    stale = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(stale):
        os.unlink(stale)
