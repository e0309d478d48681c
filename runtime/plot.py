"""The memory timeline of one training step, drawn from a :class:`MemoryPlan`.

x is the node index in schedule order, y the bytes live after that node, stacked by category:
persistent tensors at the bottom (constant bands), then what the step allocates and frees. Lines
mark the budget, the predicted peak (with the node it happens at), the measured peak once the step
has run, and where the backward starts when the caller knows it.

matplotlib is optional (``pip install memfit[plot]``) and imported only when a picture is drawn; the
figure is rendered with the Agg canvas directly, so the caller's pyplot backend is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, where_what_got
from .memory import MemoryPlan, fmt_bytes

# bottom to top; persistent first (constant bands), then the tensors the step allocates and frees
CATEGORY_ORDER = ("parameters", "buffers", "optimizer state", "gradient accumulators", "pass state", "batch",
                  "gradients", "saved activations", "temporaries", "kernel workspace")
COLORS = {
    "parameters": "#4c72b0", "buffers": "#8da0cb", "optimizer state": "#55a868", "gradient accumulators": "#8fd18f",
    "pass state": "#64b5cd", "batch": "#b3b3b3",
    "gradients": "#dd8452", "saved activations": "#c44e52", "temporaries": "#e6b422", "kernel workspace": "#8172b3",
}
EXTRA_COLORS = ("#937860", "#da8bc3", "#8c8c8c", "#ccb974")
FIGSIZE, DPI = (12, 6), 100  # 1200 x 600 px
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def plot_memory(plan: MemoryPlan, path: str | os.PathLike, *, title: str | None = None,
                backward_start: int | None = None) -> Path:
    """Draw ``plan``'s memory timeline to ``path`` (format from the suffix, e.g. ``.png``) and return the path.

    ``backward_start`` is the index of the first backward node, when known (a plan carrying a
    ``backward_start`` of its own is used otherwise); when neither says, the line marks the first
    gradient the step produces, a few nodes into the backward.
    """
    where = "memfit.plot_memory"
    if not isinstance(plan, MemoryPlan):
        raise ConfigError(where_what_got(where, "a MemoryPlan", type(plan).__name__,
                                         "pass what memfit.plan() or Trainer.plan returns"))
    n = len(plan.timeline)
    if n == 0 or not plan.category_timeline:
        raise ConfigError(where_what_got(where, "a plan with a per-node timeline", "an empty timeline",
                                         "plan the step with memfit.plan() or memfit.optimize()"))
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError as e:
        raise ConfigError(where_what_got(where, "matplotlib installed", f"ImportError ({e})",
                                         "pip install memfit[plot]")) from e
    if backward_start is None:
        backward_start = getattr(plan, "backward_start", None)

    cats = [c for c in CATEGORY_ORDER if c in plan.category_timeline]
    cats += [c for c in plan.category_timeline if c not in CATEGORY_ORDER]
    cats = [c for c in cats if any(plan.category_timeline[c])]  # empty bands only clutter the legend
    extra = iter(EXTRA_COLORS * (len(cats) // len(EXTRA_COLORS) + 1))
    colors = {c: COLORS.get(c) or next(extra) for c in cats}

    top = max(plan.peak_bytes, max(plan.timeline), plan.measured_peak_bytes or 0)
    unit, scale = next((u, s) for u, s in UNITS if top >= s or s == 1)
    budget = plan.budget_bytes
    budget_on_chart = budget is not None and budget <= 1.6 * top  # a far-off budget would flatten the picture
    ymax = max(top, budget if budget_on_chart else 0) * 1.22 / scale

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # each node's bytes hold from that node to the next: a step function over [i, i + 1)
    x = np.arange(n + 1)
    lower = np.zeros(n + 1)
    for c in cats:
        ys = np.asarray(plan.category_timeline[c], dtype=np.float64) / scale
        upper = lower + np.append(ys, ys[-1])
        ax.fill_between(x, lower, upper, step="post", color=colors[c], alpha=0.85, linewidth=0,
                        label=f"{c} ({fmt_bytes(plan.at_peak.get(c, 0))} at peak)")
        lower = upper
    total = np.asarray(plan.timeline, dtype=np.float64) / scale
    ax.step(x, np.append(total, total[-1]), where="post", color="#222222", linewidth=0.8)

    peak_i = plan.node_names.index(plan.peak_node) if plan.peak_node in plan.node_names else int(total.argmax())
    peak_y = plan.peak_bytes / scale
    ax.plot([peak_i + 0.5], [peak_y], marker="v", markersize=10, color="#d62728", markeredgecolor="white", zorder=5)
    left = peak_i > 0.6 * n  # keep the label inside the axes
    ax.annotate(f"predicted peak {fmt_bytes(plan.peak_bytes)}\nat node {plan.peak_node}",
                xy=(peak_i + 0.5, peak_y), xytext=(-28 if left else 28, 6), textcoords="offset points",
                ha="right" if left else "left", va="bottom", fontsize=10, color="#d62728",
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#d62728", alpha=0.9),
                arrowprops=dict(arrowstyle="-", color="#d62728", lw=1))

    if budget is not None:
        fits = plan.peak_bytes <= budget
        label = f"budget {fmt_bytes(budget)} ({'fits' if fits else 'over by ' + fmt_bytes(plan.peak_bytes - budget)})"
        if budget_on_chart:
            ax.axhline(budget / scale, color="#2ca02c" if fits else "#d62728", linestyle="--", linewidth=1.6,
                       label=label)
        else:  # a legend entry only: the line would sit far above the chart
            ax.plot([], [], linestyle="none", label=f"{label}, far above the chart")
    if plan.measured_peak_bytes is not None:
        err = (plan.measured_peak_bytes - plan.peak_bytes) / max(plan.peak_bytes, 1)
        ax.axhline(plan.measured_peak_bytes / scale, color="#111111", linestyle=":", linewidth=1.8,
                   label=f"measured peak {fmt_bytes(plan.measured_peak_bytes)} ({err:+.1%} vs predicted)")
    split, after = backward_start, "backward →"
    if split is None:  # the first gradient comes a few nodes after the backward starts (past the loss's own grad)
        grads = plan.category_timeline.get("gradients", ())
        split, after = next((i for i, b in enumerate(grads) if b), None), "first gradient (backward) →"
    if split is not None and 0 < split < n:
        ax.axvline(split, color="#555555", linestyle="-.", linewidth=1)
        ax.text(split, ymax * 0.985, f"  {after}", ha="left", va="top", fontsize=9, color="#555555")
        ax.text(split, ymax * 0.985, "← forward  ", ha="right", va="top", fontsize=9, color="#555555")

    ax.set_xlim(0, n)
    ax.set_ylim(0, ymax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"node in schedule order ({n} nodes)")
    ax.set_ylabel(f"live memory ({unit})")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
              frameon=False, borderaxespad=0)  # reversed: the legend reads top to bottom like the stack
    fig.suptitle(title or "Memory of one training step", fontsize=14)
    ax.set_title(f"predicted peak {fmt_bytes(plan.peak_bytes)}; passes: {', '.join(plan.passes) or 'none'}",
                 fontsize=10, color="#444444")
    out = Path(path)
    fig.savefig(out)
    return out
