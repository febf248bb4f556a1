"""Figures the reliability tests collect during a run; tests/conftest.py prints them at the end
(pytest_terminal_summary) and docs/reliability.md records one run's values.

A plain module (imported as ``reliability_figures`` by the tests and by conftest, the same object).
"""
from collections import Counter

FIGURES = {
    "bad_inputs": 0,  # rows of docs/errors.md exercised (each a one-line error with the documented exit code)
    "kills_survived": 0,  # SIGKILLs during checkpoint saves after which the latest complete checkpoint resumed
    "fuzz_examples": Counter(),  # op -> hypothesis examples compared with the float64 reference (fwd + bwd)
    "coverage_skips": [],  # (test, reason): coverage that a missing ISA / feature removed, recorded
}


def add(key, n=1):
    FIGURES[key] += n


def fuzz(op, n=1):
    FIGURES["fuzz_examples"][op] += n


def skipped(what, why):
    FIGURES["coverage_skips"].append((what, why))
