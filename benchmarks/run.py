"""Run the benchmark suites: ``python -m benchmarks.run --suite cpu|gpu [--only NAME] [--no-record]``.

``python -m benchmarks.run --ingest FILE`` records the rows a streamed run left in FILE (see
``FASTFT_BENCH_STREAM`` in benchmarks/common.py), with the environment written at its top.

Imports every ``benchmarks/bench_*.py`` that defines ``run(suite) -> list[dict]`` (``--only attention``
or ``--only bench_attention`` picks one; repeatable), runs them in name order, prints each row, and
records each module's rows, as soon as it finishes, with the environment (date, machine, versions, commit) through
``benchmarks.common.record``: JSON lines appended to ``benchmarks/results/<suite>.jsonl``, the
markdown table ``<suite>.md`` and one PNG per module. A module that raises is reported as an
``error`` row and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback

from . import common


def discover() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["cpu", "gpu"])
    ap.add_argument("--ingest", metavar="FILE", help="record the rows of a streamed run (FASTFT_BENCH_STREAM)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this bench module (e.g. cpu or bench_cpu); repeatable")
    ap.add_argument("--no-record", action="store_true", help="print only; write nothing under benchmarks/results")
    args = ap.parse_args(argv)
    if args.ingest:
        return ingest(args.ingest)
    if args.suite is None:
        ap.error("--suite is required (or --ingest FILE)")

    names = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = wanted - set(names)
        if unknown:
            ap.error(f"unknown bench module(s) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in wanted]
    common.device_for(args.suite)  # fail early and clearly without the suite's device

    env = common.environment(args.suite)
    print(f"# suite {args.suite}  {env['date']}  commit {env['commit']}")
    print(f"# machine {env['machine']}\n# versions {env['versions']}", flush=True)
    if os.environ.get("FASTFT_BENCH_STREAM"):
        with open(os.environ["FASTFT_BENCH_STREAM"], "a") as f:
            f.write(json.dumps({"_env": env}, sort_keys=True) + "\n")
    rows, failed = [], False
    for name in names:
        mod = importlib.import_module(f"{__package__}.{name}")
        if not callable(getattr(mod, "run", None)):
            continue
        short = name[len("bench_"):]
        t0 = time.perf_counter()
        common.CURRENT_BENCH = short
        try:
            out = list(mod.run(args.suite))
        except Exception as e:  # keep the other benchmarks' results
            traceback.print_exc()
            out, failed = [{"case": name, "impl": "-", "error": f"{type(e).__name__}: {e}"}], True
        for r in out:
            r.setdefault("bench", short)
            print({k: v for k, v in r.items()}, flush=True)
        print(f"# {name}: {len(out)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += out
        if not args.no_record and out:  # per module: a run cut short keeps what finished
            paths = common.record(args.suite, out, env)
            print(f"# recorded: {paths}", flush=True)
    return 1 if failed else 0


def ingest(path: str, results_dir: str = common.RESULTS_DIR) -> int:
    """Record the rows of a streamed run: the first ``{"_env": ...}`` line is the environment."""
    env, by_bench = None, {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:  # a line cut off when the run was killed
                print(f"# {path}:{n}: skipped a malformed line")
                continue
            if "_env" in obj:
                env = obj["_env"]
                continue
            by_bench.setdefault(obj.get("bench", "misc"), []).append(obj)
    if env is None:
        raise SystemExit(f"{path}: no environment line ({{'_env': ...}}) at the top: not a streamed run")
    for bench, rows in by_bench.items():
        paths = common.record(env["suite"], rows, env, results_dir=results_dir)
        print(f"# {bench}: {len(rows)} rows recorded: {paths}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
