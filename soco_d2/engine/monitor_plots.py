"""The monitors' curves: ``OUTPUT_DIR/monitor_curves.png`` from the rows of ``metrics.json``."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional

__all__ = ["plot_monitor_curves"]


def plot_monitor_curves(rows: List[Dict], path: str, chance_level: Optional[float] = None,
                        emb_dim: Optional[int] = None) -> None:
    """A PNG of the losses (with the chance level), kNN accuracies, RankMe and embedding std
    found in the ``metrics.json`` rows; panels without data are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key):
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = sorted({k for r in rows for k in r})
    panels = []
    losses = [k for k in keys if k.startswith("loss")] + (["total_loss"] if "total_loss" in keys else [])
    if losses:
        panels.append(("losses", losses))
    terms = [k for k in keys if re.search(r"_res[2-5]$", k)]  # DetCo's unweighted InfoNCE terms
    if terms and chance_level is not None:
        panels.append(("InfoNCE terms", terms))
    knn = [k for k in keys if k.startswith("knn_") and k.endswith("_top1")]
    if knn:
        panels.append(("kNN top-1 (%)", knn))
    if "rankme" in keys:
        panels.append(("RankMe (effective rank)", ["rankme"]))
    if "emb_std" in keys:
        panels.append(("per-dimension std of normalised embeddings", ["emb_std"]))
    if not panels:
        return
    fig = Figure(figsize=(4.5 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            x, y = series(name)
            ax.plot(x, y, "o-" if len(x) < 30 else "-", markersize=3, label=name)
        if title == "InfoNCE terms":
            ax.axhline(chance_level, color="grey", ls="--", label=f"chance per term ln(Q+1) = {chance_level:.2f}")
        if title.startswith("per-dimension") and emb_dim:
            ax.axhline(1 / math.sqrt(emb_dim), color="grey", ls="--", label=f"1/sqrt({emb_dim})")
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
