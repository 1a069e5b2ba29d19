"""Plots written beside a run's outputs."""

from pathlib import Path

import numpy as np


def plot_loss(history: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(history) + 1), history, lw=1, alpha=0.5, label="loss")
    if len(history) >= 10:
        window = max(2, len(history) // 10)
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(range(window, len(history) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
