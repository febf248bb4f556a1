"""Several processes on PyTorch's engine (gloo on CPU): DDP and FSDP2 (LoRA and NF4-sharded QLoRA)
against one process with the same global batch, resume across world sizes, the launcher, failures.

The multi-process jobs are real ``torchrun`` launches (``torch.distributed.run --standalone``,
which picks a free port) of tests/dist_worker.py or of ``fastft train``. They are few and tiny (a
2-layer Llama of hidden size 64) so the file stays well under the CI budget on two CPU cores.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dist_worker import run_job, worker_env  # noqa: E402

from fastft.cli import main  # noqa: E402

LR = 2e-3
STEPS = 10


_env = worker_env


def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from models_util import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("dist-llama"), "llama")


def _job(tiny_dir, out, quant=None, strategy=None, batch=2, **kw):
    return {**dict(model_dir=tiny_dir, quantization=quant, strategy=strategy, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=2, max_steps=STEPS, save_steps=5, learning_rate=LR,
                   output_dir=str(out)), **kw}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """One process with batch 4 (the references) and one 2-rank torchrun job with batch 2 per rank:
    DDP LoRA, FSDP LoRA, FSDP QLoRA (with gradient checkpointing: recomputation under FSDP's hooks),
    FSDP QLoRA resumed from the 1-process checkpoint at step 5, and the HF path (4 steps).
    25 examples: the last global micro-batch of an epoch has one example, so one rank has none."""
    root = tmp_path_factory.mktemp("dist-runs")
    ref = {q: run_job(_job(tiny_dir, root / f"ref-{q}", q, batch=4)) for q in (None, "nf4")}
    ref["hf"] = run_job(_job(tiny_dir, root / "ref-hf", "nf4", batch=4, hf=True, max_steps=4, save_steps=None))
    jobs = [_job(tiny_dir, root / "ddp-lora", None, "ddp"), _job(tiny_dir, root / "fsdp-lora", None, "fsdp"),
            _job(tiny_dir, root / "fsdp-qlora", "nf4", "fsdp", gradient_checkpointing=True),
            _job(tiny_dir, root / "fsdp-qlora-resumed", "nf4", "fsdp", resume=str(root / "ref-nf4" / "checkpoint-5")),
            _job(tiny_dir, root / "hf-fsdp-qlora", "nf4", "fsdp", hf=True, max_steps=4, save_steps=None)]
    (root / "jobs.json").write_text(json.dumps(jobs))
    _torchrun([os.path.join(HERE, "dist_worker.py"), str(root / "jobs.json")])
    got = {name: json.loads((root / name / "result.json").read_text())
           for name in ("ddp-lora", "fsdp-lora", "fsdp-qlora", "fsdp-qlora-resumed", "hf-fsdp-qlora")}
    return root, ref, got


def _assert_losses_equal(got, ref):
    # fp32 reduction-order noise only: the same examples, summed in another order.
    assert len(got) == len(ref) == STEPS
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def _assert_adapters_equal(a_dir, b_dir):
    a, b = load_file(os.path.join(a_dir, "adapter_model.safetensors")), load_file(
        os.path.join(b_dir, "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # AdamW divides by sqrt(v): an element whose gradient is ~0 turns reduction-order noise into a
    # visible fraction of its (<= lr sized) step. Bound: no element off by 1 % of one step, and
    # virtually all (>= 99 %) equal to fp32 rounding of the weights (1e-6 on values ~0.1).
    assert diffs.max() <= 1e-2 * LR, diffs.max()
    assert (diffs > 1e-6).float().mean() <= 0.01


def test_ddp_lora_matches_one_process(runs):
    root, ref, got = runs
    assert got["ddp-lora"]["strategy"] == "ddp" and got["ddp-lora"]["world_size"] == 2
    _assert_losses_equal(got["ddp-lora"]["losses"], ref[None]["losses"])
    _assert_adapters_equal(root / "ddp-lora", root / "ref-None")
    # One gradient reduction per optimizer step (the tiny model's LoRA grads fill one bucket), not
    # one per micro-step: no sync on the gradient-accumulation micro-steps.
    assert got["ddp-lora"]["reductions"] == STEPS


@pytest.mark.parametrize("name,quant", [("fsdp-lora", None), ("fsdp-qlora", "nf4")])
def test_fsdp_matches_one_process(runs, name, quant):
    root, ref, got = runs
    r = got[name]
    assert r["strategy"] == "fsdp" and r["world_size"] == 2
    assert min(r["losses"]) > 1.0  # not the silent loss = 0 of broken FSDP-QLoRA setups
    # QLoRA loads its 2 x 7 NF4 layers pending: each rank quantizes only its shard (the default path)
    assert r["pending_at_load"] == (14 if quant else 0)
    _assert_losses_equal(r["losses"], ref[quant]["losses"])
    _assert_adapters_equal(root / name, root / f"ref-{quant}")
    # Every LoRA gradient (gathered from the shards, at the last step) is finite and non-zero.
    stats = r["grad_stats"]
    assert stats and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in stats)
    for k, (finite, norm) in stats.items():
        assert finite and norm > 0, k


def test_hf_patched_qlora_under_fsdp2(runs):
    """The HF path: transformers Llama + PEFT LoRA + fastft.patch(quantization="nf4"), NF4 layers made
    shardable and each LlamaDecoderLayer one fully_shard unit (what accelerate's FSDP2 plugin does on
    GPUs): the same losses as one process, finite non-zero LoRA gradients, a PEFT adapter on disk."""
    root, ref, got = runs
    r = got["hf-fsdp-qlora"]
    assert r["strategy"] == "fsdp" and min(r["losses"]) > 1.0
    torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                               torch.tensor(ref["hf"]["losses"], dtype=torch.float64), rtol=1e-5, atol=0)
    assert r["grad_stats"] and all(f and n > 0 for f, n in r["grad_stats"].values())
    a = load_file(str(root / "hf-fsdp-qlora" / "adapter_model.safetensors"))
    b = load_file(str(root / "ref-hf" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    assert json.loads((root / "hf-fsdp-qlora" / "adapter_config.json").read_text())["r"] == 4


def test_fsdp_qlora_shards_the_4bit_weights(runs):
    """Each rank holds half of the frozen bytes: the NF4 codes and block scales are sharded."""
    _root, ref, got = runs
    per_rank = got["fsdp-qlora"]["held_bytes_per_rank"]
    one = ref["nf4"]["held_bytes"]
    for b in per_rank:
        # dim-0 shards of odd sizes are padded: at most one row per tensor more than half
        assert 0.45 * one["params_frozen"] <= b["params_frozen"] <= 0.55 * one["params_frozen"]
        assert b["optimizer"] == one["optimizer"] // 2 and b["params_trainable"] == one["params_trainable"] // 2


def test_resume_across_world_sizes(runs, tiny_dir):
    root, ref, got = runs
    # N=1 checkpoint -> N=2 (FSDP): continues exactly where the one-process run went on.
    _assert_losses_equal(got["fsdp-qlora-resumed"]["losses"], ref["nf4"]["losses"])
    # N=2 (FSDP) checkpoint -> N=1: the same; the sharded run's checkpoint holds full tensors.
    ck = root / "fsdp-qlora" / "checkpoint-5"
    assert load_file(str(ck / "trainable_params.safetensors"))  # full tensors, single-process layout
    out = root / "n1-from-n2"
    res = run_job(_job(tiny_dir, out, "nf4", batch=4, resume=str(ck)))
    _assert_losses_equal(res["losses"], ref["nf4"]["losses"])
    _assert_adapters_equal(out, root / "ref-nf4")
    # A different global batch is a different data order: refused, naming the reason.
    with pytest.raises(ValueError, match="per_device_train_batch_size x ranks"):
        run_job(_job(tiny_dir, root / "bad", "nf4", batch=2, resume=str(ck)))


def test_only_rank0_writes(runs):
    root, _ref, _got = runs
    rows = [json.loads(x) for x in (root / "ddp-lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, not one per rank
    assert sorted(p.name for p in (root / "fsdp-lora").iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-10", "checkpoint-5"]
    assert not [p for p in (root / "fsdp-lora").iterdir() if p.name.startswith(".tmp")]


# --- the command line: launcher, seed, failures ----------------------------------------------------
@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A tiny Llama with the real SmolLM2 tokenizer, and prompt/completion data."""
    from models_util import save_tiny_checkpoint

    from fastft.models.convert import smollm2_path

    root = tmp_path_factory.mktemp("dist-cli")
    d = save_tiny_checkpoint(root, "llama", vocab_size=49152, max_position_embeddings=128, hidden_size=32,
                             intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=2, num_hidden_layers=1)
    tok = smollm2_path()
    for f in os.listdir(tok):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(os.path.join(tok, f), d)
    rows = [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"} for a in range(6) for b in range(6)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, str(data)


def _cli_train(capsys, argv):
    rc = main(["train", *argv])
    out = capsys.readouterr()
    assert rc in (0, None), out.err
    return json.loads(out.out[out.out.index("{"):])


def test_seed_reaches_lora_init(cli_dir, tmp_path, capsys):
    """Two identical runs are identical (losses and adapters); another seed is not."""
    model, data = cli_dir
    # (before the fix, step 1 agreed -- B = 0 hides A -- and step 2 differed)
    common = ["--model", model, "--data", data, "--r", "4", "--max-steps", "2", "--learning-rate", "0.01",
              "--per-device-train-batch-size", "4", "--lora-dropout", "0.1"]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _cli_train(capsys, [*common, "--seed", str(seed), "--output-dir", str(tmp_path / name)])
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in rows if "loss" in r], load_file(str(tmp_path / name / "adapter_model.safetensors")))
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(runs["a"][1][k], runs["b"][1][k]) for k in runs["a"][1])
    assert not all(torch.equal(runs["a"][1][k], runs["c"][1][k]) for k in runs["a"][1])


def test_python_m_fastft():
    r = subprocess.run([sys.executable, "-m", "fastft", "train", "--help"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--nproc" in r.stdout and "--strategy" in r.stdout


@pytest.mark.parametrize("extra,match", [
    (["--strategy", "zero3"], None),  # argparse: invalid choice
    (["--data", "/nonexistent/train.jsonl"], "does not exist"),
    (["--learning-rate", "-1"], "learning_rate"),
    (["--nnodes", "2"], "rdzv-endpoint"),
])
def test_bad_options_fail_before_workers_start(cli_dir, tmp_path, capsys, extra, match):
    model, data = cli_dir
    argv = ["train", "--model", model, "--data", data, "--nproc", "2", "--output-dir", str(tmp_path / "o"), *extra]
    t0 = time.perf_counter()
    try:
        rc = main(argv)
        msg = capsys.readouterr().err
    except SystemExit as e:
        rc, msg = e.code, str(e.code) + capsys.readouterr().err
    assert rc not in (0, None)
    if match:
        assert match in msg
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 20  # no worker was started (that takes seconds per process)


def _worker_pids(launcher_pid):
    import psutil

    out = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "fastft" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p.pid
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_kill_one_rank(cli_dir, tmp_path, capsys):
    """Two "machines" (two launchers of one worker each, c10d rendezvous): training runs; killing
    rank 1 mid-run makes rank 0 exit non-zero within the collective timeout, naming the failure;
    the last checkpoint is intact and resumes on one process (same global batch)."""
    model, data = cli_dir
    out = tmp_path / "run"
    ep = f"127.0.0.1:{_free_port()}"
    argv = ["-m", "fastft", "train", "--model", model, "--data", data, "--r", "4", "--lora-dropout", "0",
            "--max-steps", "500", "--save-steps", "2", "--logging-steps", "1", "--per-device-train-batch-size", "2",
            "--lr-scheduler-type", "constant", "--learning-rate", "0.01", "--strategy", "ddp", "--ddp-timeout", "60",
            "--output-dir", str(out), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", ep, "--rdzv-id", "t"]
    nodes = [subprocess.Popen([sys.executable, *argv, "--node-rank", str(i)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoint-4").is_dir():
            assert all(n.poll() is None for n in nodes), [n.communicate()[1][-3000:] for n in nodes]
            time.sleep(0.2)
        assert (out / "checkpoint-4").is_dir(), "training did not reach step 4"
        pids = {}
        for n in nodes:
            pids.update(_worker_pids(n.pid))
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.time()
        errs = [n.communicate(timeout=90)[1] for n in nodes]
        assert time.time() - t_kill < 90
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert all(n.returncode != 0 for n in nodes)
    # node 0's worker (rank 0) names the failed collective; node 1's launcher names the killed worker.
    assert "rank 0/2: a collective operation failed" in errs[0], errs[0][-3000:]
    assert "SIGKILL" in errs[1] or "Signal 9" in errs[1], errs[1][-3000:]
    from fastft.train import checkpoint as ckpt

    last = ckpt.latest_checkpoint(str(out))
    step = ckpt.read_trainer_state(last)["global_step"]
    assert step >= 4
    logged = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    res = _cli_train(capsys, ["--model", model, "--data", data, "--r", "4", "--lora-dropout", "0",
                              "--max-steps", str(step + 1), "--save-steps", "2", "--logging-steps", "1",
                              "--per-device-train-batch-size", "4", "--lr-scheduler-type", "constant",
                              "--learning-rate", "0.01", "--output-dir", str(out), "--resume-from-checkpoint", last])
    assert res["global_step"] == step + 1
    if step + 1 in logged:  # the killed run got past the checkpoint: the resumed step is the same step
        assert abs(res["final_loss"] - logged[step + 1]) <= 1e-5 * abs(logged[step + 1])


# --- fastft plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,quant,devices", [("ref-None", None, 1), ("ref-nf4", "nf4", 1),
                                                ("fsdp-lora", None, 2), ("fsdp-qlora", "nf4", 2)])
def test_plan_matches_measured_bytes(runs, tiny_dir, name, quant, devices):
    """The plan's static parts equal the tensor bytes each rank of the tiny runs held (measured at the
    last step: local parameter shards, buffers, gradients, AdamW state) within 10 %. Tensor bytes,
    not RSS: a CPU process's RSS is ~500 MB of interpreter and libraries around ~0.5 MB of tensors."""
    from fastft.plan import plan

    _root, ref, got = runs
    res = ref[quant] if devices == 1 else got[name]
    p = plan(tiny_dir, method="qlora" if quant else "lora", devices=devices, strategy="fsdp", r=4, dtype_bytes=4)
    for held in res["held_bytes_per_rank"]:
        pairs = {"frozen": (held["params_frozen"] + held["buffers"], p["weights"] + p["scales"]),
                 "lora": (held["params_trainable"], p["lora"]), "grads": (held["grads"], p["grads"]),
                 "optimizer": (held["optimizer"], p["optimizer"])}
        for k, (measured, planned) in pairs.items():
            assert measured > 0 and abs(planned - measured) <= 0.10 * measured, (k, measured, planned)


def test_plan_cli_named_shapes(capsys):
    assert main(["plan", "--model", "70B", "--devices", "1,2,4,8"]) in (0, None)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 70B")]
    assert len(rows) == 4
    w = [float(r.split("|")[5]) for r in rows]  # weights shrink with the device count (sharded)
    assert w[0] > 35 and abs(w[1] - w[0] / 2) < 0.01 * w[0] and abs(w[3] - w[0] / 8) < 0.01 * w[0]
    assert main(["plan", "--model", "71B"]) == 2
    assert "unknown model '71B'" in capsys.readouterr().err


def test_failure_messages_and_defaults(tiny_dir):
    """Collective failures and timeouts read as such; strategy defaults; bad values fail early."""
    from fastft.train import TrainingArguments
    from fastft.train import distributed as D

    err = getattr(torch.distributed, "DistBackendError", RuntimeError)("[gloo] Timed out waiting 60000ms for recv")
    msg = D.describe_failure(err, 60)
    assert "a collective operation failed" in msg and "Timed out" in msg and "60s" in msg and "--ddp-timeout" in msg
    assert D.describe_failure(ValueError("bad data row 3"), 60) == "rank 0/1 failed: ValueError: bad data row 3"
    import fastft

    assert D.default_strategy(fastft.from_pretrained(tiny_dir)) == "ddp"
    assert D.default_strategy(fastft.from_pretrained(tiny_dir, quantization="nf4")) == "fsdp"
    with pytest.raises(ValueError, match="distributed_strategy"):
        TrainingArguments(distributed_strategy="zero3")
    with pytest.raises(ValueError, match="ddp_timeout"):
        TrainingArguments(ddp_timeout=0)


def test_shardable_nf4_linear_is_the_same_layer():
    """ShardableNF4Linear computes exactly what the QuantLinear it replaces did, saves the same
    bitsandbytes keys, and lays its bytes out one quantization block per dim-0 row."""
    from fastft.nn import QuantLinear
    from fastft.nn.sharded_quant_linear import ShardableNF4Linear

    torch.manual_seed(0)
    for dq in (True, False):
        ql = QuantLinear.from_linear(torch.nn.Linear(128, 48, bias=True), "nf4", double_quant=dq)
        sl = ShardableNF4Linear.from_quant_linear(ql)
        x = torch.randn(3, 5, 128)
        assert torch.equal(sl(x), ql(x))
        assert sl.qdata.shape == (48 * 128 // 64, 32) and sl.qabsmax.shape == (96, 1 if dq else 4)
        assert all(not p.requires_grad for p in sl.parameters() if p is not sl.bias)
        a, b = ql.state_dict(), sl.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="multiple of the block size"):
        ShardableNF4Linear.from_quant_linear(QuantLinear.from_linear(torch.nn.Linear(33, 3), "nf4"))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_plan_activations_match_saved_tensors(tiny_dir, quant):
    """The activation estimate against the bytes autograd really saves (saved_tensors_hooks, unique
    storages that are not parameters), fp32 tiny Llama, batch 2 x 48 tokens: without checkpointing
    all of it; with checkpointing what the forward keeps plus one block's share of the full set
    (the block being recomputed in backward). Within 10 %."""
    from dist_worker import build_model

    from fastft.plan import activation_bytes, load_shape

    cfg = load_shape(tiny_dir)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))

    def saved(checkpointing):
        model = build_model(dict(model_dir=tiny_dir, quantization=quant)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss.backward()
        return sum(seen.values())

    full, kept = saved(False), saved(True)
    print(f"saved bytes: full {full}, checkpointed {kept}")
    est_full = activation_bytes(cfg, ids.numel(), False, act_bytes=4, r=4)
    est_ckpt = activation_bytes(cfg, ids.numel(), True, act_bytes=4, r=4)
    assert abs(est_full - full) <= 0.10 * full, (est_full, full)
    peak_ckpt = kept + full / cfg["num_hidden_layers"]
    assert abs(est_ckpt - peak_ckpt) <= 0.10 * peak_ckpt, (est_ckpt, peak_ckpt)
