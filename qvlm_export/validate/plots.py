"""Report figures as base64 PNG strings (matplotlib, Agg backend, no display needed).

Each function takes plain data (lists and dicts from ``report.json``) and returns the PNG
as base64 text for an ``<img src="data:image/png;base64,...">`` tag, so the HTML report
is one self-contained file.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure(width: float = 8.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=90)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    # Fixed metadata keeps the PNG bytes independent of the matplotlib build date.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: Sequence[float], cap: float) -> list[float]:
    return [min(v, cap) if math.isfinite(v) else cap for v in values]


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, title: str,
                 thresholds: dict[str, float] | None = None, cap: float = 100.0) -> str:
    """Bars per group and series; inf values are drawn at ``cap``; optional threshold lines per series."""
    fig, ax = _figure(max(6.0, 0.9 * len(groups) + 3))
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, _finite(values, cap), width, label=name, color=COLORS[i % len(COLORS)])
        if thresholds and name in thresholds:
            ax.axhline(thresholds[name], color=COLORS[i % len(COLORS)], linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)  # headroom so the legend row never covers a bar
    ax.legend(fontsize=8, ncol=n, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def short_layer_name(name: str) -> str:
    """``model.language_model.layers.3.mlp.up_proj`` -> ``decoder 3.mlp.up_proj`` (axis labels must fit)."""
    stack = "vision" if "vision" in name else "decoder" if "language_model" in name or name.startswith("decoder") else ""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return f"{stack} {'.'.join(parts[i:])}".strip()
    return parts[-1]


def layer_line(layers: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, title: str,
               blocks: Sequence[Sequence[int]] | None = None, hline: float | None = None) -> str:
    """Per-layer values as lines; ``blocks`` (lists of layer indices) are shaded alternately."""
    fig, ax = _figure(max(7.0, 0.12 * len(layers) + 4), 3.4)
    for b, block in enumerate(blocks or []):
        if block:
            ax.axvspan(min(block) - 0.5, max(block) + 0.5, color="#999999" if b % 2 else "#dddddd", alpha=0.35,
                       linewidth=0)
    for i, (name, values) in enumerate(series.items()):
        # NaN and inf are left out of the line (matplotlib skips NaN) rather than squashing the axis.
        ax.plot(range(len(values)), [v if math.isfinite(v) else math.nan for v in values], marker="o", markersize=3, label=name,
                color=COLORS[i % len(COLORS)])
    if hline is not None:
        ax.axhline(hline, color="#c44e52", linestyle="--", linewidth=1)
    step = max(1, len(layers) // 30)
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([short_layer_name(layers[i]) for i in range(0, len(layers), step)], rotation=75, ha="right", fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f" ({len(blocks)} blocks shaded)" if blocks else ""), fontsize=10)
    if series:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
