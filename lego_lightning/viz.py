"""Figures of exits, confidence and routing, drawn once for TensorBoard, the notebooks and the benchmarks.

Every function returns a matplotlib ``Figure`` (or draws on the ``ax`` it is given) from plain
data: sweep points from :func:`lego_lightning.evaluation.threshold_sweep`, confidences from
:func:`lego_lightning.evaluation.collect_exit_outputs`, or scalars read back from a run's
TensorBoard logs with :func:`read_scalars`. matplotlib is an optional dependency (the ``viz``
extra); it is imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

Series = Sequence[tuple[int, float]]  # (step, value)


def _pyplot() -> Any:
    # No backend is forced: matplotlib takes Agg on a machine without a display, and a
    # notebook keeps its inline backend (forcing Agg here hid every figure in notebooks).
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("lego_lightning.viz needs matplotlib: pip install 'lego-lightning[viz]'") from err
    return plt


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = _pyplot().subplots(figsize=figsize)
    return fig, ax


def read_scalars(log_dir: str | Path, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run (tags starting with ``prefix``) as ``(step, value)`` lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def confidence_histogram(
    confidences: Mapping[int, Tensor], threshold: float | None = None, bins: int = 60, ax: Any = None
) -> Any:
    """Histogram of each exit's token confidences (log-spaced bins), the routing threshold as a line."""
    fig, ax = _axes(ax, (6.0, 3.6))
    floor = 1e-4
    edges = torch.logspace(torch.log10(torch.tensor(floor)), 0, bins + 1)
    for exit_layer, conf in confidences.items():
        ax.hist(
            conf.detach().float().clamp(min=floor).cpu().numpy(),
            bins=edges.numpy(),
            alpha=0.55,
            label=f"exit after layer {exit_layer}",
        )
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("confidence")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def sweep_curve(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    points: Mapping[str, tuple[float, float]] | None = None,
    x: str = "flops_ratio",
    y: str = "ppl",
    title: str = "Routed perplexity against compute",
    ax: Any = None,
) -> Any:
    """One line per threshold sweep (``y`` against ``x``), and single ``points`` such as a full model."""
    fig, ax = _axes(ax, (6.5, 4.2))
    for name, sweep in curves.items():
        pts = sorted(sweep, key=lambda p: p[x])
        ax.plot([p[x] for p in pts], [p[y] for p in pts], "-o", ms=3, label=name)
    for name, (px, py) in (points or {}).items():
        ax.plot([px], [py], "*", ms=10, label=name)
    ax.set_xlabel(
        {"flops_ratio": "FLOPs ratio (heads and confidence counted)", "layers_ratio": "layers ratio"}.get(x, x)
    )
    ax.set_ylabel({"ppl": "routed validation PPL"}.get(y, y))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def exit_fractions(fractions: Mapping[int, Series], ax: Any = None) -> Any:
    """Stacked share of tokens leaving at each exit, over training steps."""
    fig, ax = _axes(ax, (6.0, 3.6))
    exits = sorted(fractions)
    steps = [s for s, _ in fractions[exits[0]]]
    ax.stackplot(steps, [[v for _, v in fractions[k]] for k in exits], labels=[f"exit {k}" for k in exits], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def metric_curves(
    scalars: Mapping[str, Series],
    title: str = "",
    ylabel: str = "",
    log_y: bool = False,
    styles: Mapping[str, str] | None = None,
    ax: Any = None,
) -> Any:
    """One line per series (e.g. ``val/exit{k}/ppl`` read back with :func:`read_scalars`)."""
    fig, ax = _axes(ax, (6.0, 3.6))
    for name, series in scalars.items():
        ax.plot([s for s, _ in series], [v for _, v in series], (styles or {}).get(name, "-"), label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as an image and close it."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path
