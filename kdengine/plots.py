"""PNG figures of a run (matplotlib, Agg backend): training curves and teacher-vs-student logits."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], metric: str, path: str) -> str:
    """Training loss (and any other ``*_loss`` logged) and the eval metric against the step."""
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if f"eval_{metric}" in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for r in train for k in r if k == "loss" or k.endswith("_loss")})
    for key in keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*points), label=key)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval_loss")
        ax_metric.plot([r["step"] for r in evals], [r[f"eval_{metric}"] for r in evals], "o-")
    ax_loss.set(xlabel="step", ylabel="loss", title="losses")
    ax_loss.legend()
    ax_metric.set(xlabel="step", ylabel=f"eval_{metric}", title=f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_logits(teacher: np.ndarray, student: np.ndarray, label_names: list[str], path: str,
                title: str = "teacher vs student logits") -> str:
    """Scatter of teacher against student logits per class, plus both as heatmaps.

    Args:
        teacher, student: [N, C] logits of the same N validation examples (or tokens).
        label_names: the C class names.
    """
    n_show = min(len(teacher), 40)
    fig = plt.figure(figsize=(13, 4.5))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.2, 1, 1])
    ax = fig.add_subplot(grid[0])
    for c, name in enumerate(label_names):
        ax.scatter(teacher[:, c], student[:, c], s=8, alpha=0.6, label=name)
    low = float(min(teacher.min(), student.min()))
    high = float(max(teacher.max(), student.max()))
    ax.plot([low, high], [low, high], "k--", linewidth=0.8)
    ax.set(xlabel="teacher logit", ylabel="student logit", title=title)
    if len(label_names) <= 10:
        ax.legend(fontsize=7)
    limit = float(np.abs(np.concatenate([teacher[:n_show], student[:n_show]])).max()) or 1.0
    for i, (name, values) in enumerate((("teacher", teacher), ("student", student))):
        heat = fig.add_subplot(grid[i + 1])
        image = heat.imshow(values[:n_show].T, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
        heat.set(title=f"{name} logits (first {n_show})", xlabel="example")
        heat.set_yticks(range(len(label_names)))
        heat.set_yticklabels(label_names if len(label_names) <= 12 else [str(c) for c in range(len(label_names))],
                             fontsize=7)
        fig.colorbar(image, ax=heat)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(directory: str, history: list[dict], metric: str, logits: tuple | None, label_names: list[str]) -> list[str]:
    """The run's PNGs in ``directory``: training_curves.png and, when given, logits.png."""
    written = [plot_curves(history, metric, os.path.join(directory, "training_curves.png"))]
    if logits is not None:
        written.append(plot_logits(logits[0], logits[1], label_names, os.path.join(directory, "logits.png")))
    return written
