"""Loss-curve PNG from ``metrics.jsonl`` (train loss per logged step, eval loss where present).

Uses matplotlib's object API with the Agg canvas directly, so it never touches pyplot's global
backend state (safe on headless machines and inside notebooks/other programs alike).
"""
from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_loss_curve(metrics_path: str, out_png: str, *, step_losses=None, title: str = "fastft training") -> str:
    """Plot the logged losses of ``metrics_path``; ``step_losses`` (one per optimizer step, from step
    1) adds the unsmoothed per-step curve behind them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if step_losses:
        ax.plot(range(1, len(step_losses) + 1), step_losses, color="tab:blue", alpha=0.35, linewidth=1,
                label="train loss (per step)")
    if train:
        # Markers too: with few logged points a bare line is invisible.
        ax.plot(*zip(*train), ".-", label="train loss (logged mean)", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals or step_losses:
        ax.legend()
    # Write-then-rename so a reader never sees a half-written PNG.
    tmp = out_png + ".tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_png)
    return out_png
