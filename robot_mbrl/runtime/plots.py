"""PNG plots for a run directory (matplotlib, headless Agg backend).

* ``returns.png``: learning and evaluation return against real steps, with the solved threshold;
* ``model_loss.png``: holdout (and fresh-data) loss of the model at each retrain;
* ``plan_time.png``: histogram of planner time per tick against the control period;
* ``gate.png``: plan disagreement and monitor scores against their thresholds, fallback shaded.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from robot_mbrl.runtime.rundir import RunDir

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(run: RunDir, trace: list[tuple] | None = None) -> list[str]:
    plt = _pyplot()
    metrics = run.metrics()
    summary = (
        json.loads((run.path / "summary.json").read_text()) if (run.path / "summary.json").exists() else {}
    )
    written = []

    learn = [m for m in metrics if m.get("kind") in ("learn", "run", "commission")]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if learn:
        ax.plot([m["real_steps"] for m in learn], [m["return"] for m in learn], "o-", label="episode return")
    if evals:
        ax.plot(
            [m["real_steps"] for m in evals],
            [m["eval_return"] for m in evals],
            "s-",
            label="eval return (mean)",
        )
    if summary.get("solved_threshold") is not None:
        ax.axhline(summary["solved_threshold"], color="k", ls="--", lw=1, label="solved")
    ax.set(xlabel="real steps", ylabel="return", title="return vs real robot steps")
    ax.legend(loc="best")
    written.append(_save(fig, run, "returns.png"))

    retrains = [m for m in metrics if m.get("kind") == "retrain"]
    if retrains:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [m["retrain"] for m in retrains]
        ax.semilogy(x, [m["holdout_mse"] for m in retrains], "o-", label="holdout MSE (normalized)")
        fresh = [(m["retrain"], m["fresh_mse"]) for m in retrains if m.get("fresh_mse") is not None]
        if fresh:
            ax.semilogy(*zip(*fresh, strict=True), "s--", label="fresh-data MSE before retrain")
        ax.set(xlabel="retrain", ylabel="loss", title="model loss per retrain")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (retrains are counted, not measured)
        ax.legend(loc="best")
        written.append(_save(fig, run, "model_loss.png"))

    plan_ms = [m["plan_ms_p50"] for m in metrics if m.get("plan_ms_p50")]
    if plan_ms or trace:
        fig, ax = plt.subplots(figsize=(7, 4))
        p = summary.get("plan_ms") or {}
        ax.hist(plan_ms, bins=20, label="per-episode median plan time")
        for k, ls in (("p50", "-"), ("p99", "--")):
            if k in p:
                ax.axvline(p[k], color="C1", ls=ls, label=f"{k} {p[k]:.1f} ms")
        ax.set(xlabel="plan time (ms)", ylabel="episodes", title="planner time per tick")
        ax.legend(loc="best")
        written.append(_save(fig, run, "plan_time.png"))

    if trace:
        t = np.asarray(trace, dtype=float)
        fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
        tick, fallback = t[:, 0], t[:, 7] > 0
        for ax, (col, thr, name) in zip(axes, ((1, 2, "plan disagreement"), (3, 4, "residual CUSUM"),
                                             (5, 6, "input OOD score")), strict=True):  # fmt: skip
            ax.plot(tick, t[:, col], lw=1, label=name)
            ax.plot(tick, t[:, thr], "r--", lw=1, label="threshold")
            ax.fill_between(tick, 0, 1, where=fallback, transform=ax.get_xaxis_transform(), color="0.85",
                            label="fallback")  # fmt: skip
            ax.set_ylabel(name)
            ax.legend(loc="upper right", fontsize=7)
        axes[-1].set_xlabel("tick")
        axes[0].set_title("gate inputs vs thresholds (grey: fallback acting)")
        written.append(_save(fig, run, "gate.png"))
    return written


def _save(fig, run: RunDir, name: str) -> str:
    path = run.plots / name
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return str(path)
