"""End-of-run report: sound certification (via :mod:`lipnet.certify`), radius histogram, plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from lipnet.certify import CertificationResult, certified_accuracy
from lipnet.certify.cli import format_table, plot_certified_accuracy
from lipnet.export.runtime import atomic_write


#: File name of the certification report in a run's folder.
REPORT = "report.json"
#: The plots written beside it (a run refuses a folder holding any of them: it would replace them).
PLOTS = ("certified_accuracy.png", "radius_histogram.png", "training_curves.png")

def certification_report(model: nn.Module, data, eps, out_dir: str | Path, *, history: list[dict] = (),
                         extra: dict | None = None, device=None, batch_size: int = 1000, progress: bool = True,
                         bins: int = 20) -> dict:
    """Certify ``model`` on ``data`` and write the report files to ``out_dir``.

    The certified numbers come from :func:`lipnet.certify.certified_accuracy` (float64
    Lipschitz bounds with rounding margins), never from training-time estimates.

    Writes ``report.json`` (clean and certified accuracy at each eps, Lipschitz bounds,
    radius histogram, ``certify_seconds``, and the entries of ``extra``), ``certified_accuracy.png`` (certified accuracy against eps),
    ``radius_histogram.png`` and, given a ``history`` of per-epoch metrics,
    ``training_curves.png``. Returns the content of ``report.json`` plus ``"table"``, the
    printable summary.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = certified_accuracy(model, data, eps, device=device, batch_size=batch_size, progress=progress)
    report = {**result.to_dict(), "radius_histogram": radius_histogram(result, bins),
              "certify_seconds": time.perf_counter() - start, **(extra or {})}
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out_dir / REPORT, lambda out: out.write(text.encode()))
    plot_certified_accuracy(result, [], out_dir / PLOTS[0], title=f"certified accuracy ({result.n} test images)")
    plot_radius_histogram(report["radius_histogram"], out_dir / PLOTS[1])
    if history:
        plot_training_curves(list(history), out_dir / PLOTS[2])
    return {**report, "table": format_table(result)}


def radius_histogram(result: CertificationResult, bins: int = 20) -> dict:
    """Counts of the certified radii of correct predictions in ``bins`` equal bins.

    The range is ``[0, max(2 * max(eps), largest finite radius)]``; radii beyond it (or
    infinite) fall in the last bin. Misclassified examples (radius 0 by definition) are
    counted separately.
    """
    radii = result.radii[result.correct].double()
    finite = radii[torch.isfinite(radii)]
    top = max(2 * max(result.eps, default=0.0), float(finite.max()) if finite.numel() else 0.0) or 1.0
    edges = torch.linspace(0, top, bins + 1, dtype=torch.float64)
    index = torch.bucketize(radii.clamp(max=top), edges[1:-1], right=True)
    counts = torch.bincount(index, minlength=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "misclassified": int((~result.correct).sum())}


def plot_radius_histogram(histogram: dict, path: Path) -> None:
    """Bar chart of :func:`radius_histogram`."""
    edges, counts = histogram["edges"], histogram["counts"]
    figure, ax = _figure()
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", edgecolor="white")
    ax.set_xlabel("certified L2 radius (correct predictions)")
    ax.set_ylabel("examples")
    ax.set_title(f"certified radii ({histogram['misclassified']} misclassified not shown)")
    figure.tight_layout()
    atomic_write(path, lambda out: figure.savefig(out, format="png"))


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracies per epoch (training-time float32 estimates, not certificates)."""
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    for key, label in (("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
                       ("train_margin_acc", "train margin accuracy*"), ("test_margin_acc", "test margin accuracy*")):
        # Epochs without the estimate (eval_every > 1) hold None.
        points = [(h["epoch"], 100 * h[key]) for h in history if h.get(key) is not None]
        if points and not all(math.isnan(v) for _, v in points):
            # Markers when some epochs lack the estimate: a single point draws no line.
            acc_ax.plot(*zip(*points), label=label, marker="o" if len(points) < len(history) else None, markersize=3)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("%")
    acc_ax.set_ylim(0, 100)
    acc_ax.grid(alpha=0.3)
    margins = sorted({h["margin"] for h in history if h.get("margin") is not None})
    asked = f"{margins[0]:.3g}" if len(margins) == 1 else "the epoch's margin"  # --offset, or sqrt(2) L train_eps
    acc_ax.legend(fontsize=8, title=f"* margin >= {asked} (estimate)", title_fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda out: figure.savefig(out, format="png"))


def _figure():
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.grid(alpha=0.3)
    return figure, ax
