"""PNG figures of simulator results (matplotlib, Agg backend: no display needed).

- ``heatmap_<policy>.png``: load per (layer, worker) as a multiple of the layer's mean, before (the initial plan on
  the first window judged) and after (the policy's latest plan on the last window), side by side.
- ``imbalance.png``: imbalance per window (mean over layers, solid; max over layers, dashed), one colour per policy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from moeray.placement.offline.simulator import SimResult


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'moeray[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_heatmaps(results: Sequence[SimResult], out_dir: str | os.PathLike) -> list[str]:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for result in results:
        first, last = result.records[0], result.records[-1]
        panels = [(first, f"before: window {first.window}, epoch {first.epoch}"),
                  (last, f"after: window {last.window}, epoch {last.epoch}")]
        rel = [r.worker_load_LW / r.worker_load_LW.mean(dim=1, keepdim=True).clamp(min=1e-12) for r, _ in panels]
        vmax = max(1.0, max(float(x.max()) for x in rel))
        fig, axes = plt.subplots(1, 2, figsize=(10, 6), sharey=True, constrained_layout=True)
        for ax, (record, title), x_LW in zip(axes, panels, rel):
            image = ax.imshow(x_LW.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"{title}\nmean imbalance {float(record.imbalance_L.mean()):.3f}", fontsize=10)
            ax.set_xlabel("worker")
        axes[0].set_ylabel("MoE layer")
        fig.colorbar(image, ax=axes, label="load / layer mean")
        fig.suptitle(f"{result.policy}: load per (layer, worker)")
        path = os.path.join(out_dir, f"heatmap_{_slug(result.policy)}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_imbalance(results: Sequence[SimResult], out_dir: str | os.PathLike) -> str:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for i, result in enumerate(results):
        windows = [r.window for r in result.records]
        imb_NL = result.imbalance_NL
        color = f"C{i % 10}"
        ax.plot(windows, imb_NL.mean(dim=1).numpy(), color=color, marker=".", label=f"{result.policy} (mean)")
        ax.plot(windows, imb_NL.max(dim=1).values.numpy(), color=color, linestyle="--", alpha=0.6,
                label=f"{result.policy} (max over layers)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("window")
    ax.set_ylabel("imbalance (max / mean worker load)")
    ax.set_title("imbalance per window")
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "imbalance.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(results: Sequence[SimResult], out_dir: str | os.PathLike) -> list[str]:
    """Every figure for ``results``; returns the paths written."""
    return plot_heatmaps(results, out_dir) + [plot_imbalance(results, out_dir)]
