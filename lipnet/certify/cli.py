"""``python -m lipnet.certify``: certify a checkpoint on a data set, optionally audit with AutoAttack.

Example::

    python -m lipnet.certify --checkpoint runs/cifar10/model.pt --data cifar10 \\
        --eps 36/255,72/255,108/255 --autoattack --out runs/cifar10/certify

prints a table (clean accuracy, certified accuracy per eps, AutoAttack robust accuracy per
eps if asked), and writes ``certify.json`` and ``certified_accuracy.png`` to ``--out``.
The exit status is 0 on success, 1 if AutoAttack broke a certified prediction (a soundness
failure, and nothing else), 2 when nothing could be certified: bad arguments, a missing
or unreadable checkpoint, missing data, data that does not fit the model, a model without a
sound bound, an ``--out`` holding earlier results (without ``--overwrite``); and 130 after
Ctrl-C (during the AutoAttack audit, once the certification and the radii audited so far are
printed and written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

from lipnet.bounds import refine_exceeding
from lipnet.bounds.gram import refines_exceeding
from lipnet.certify.accuracy import DEFAULT_EPS, CertificationResult, certified_accuracy
from lipnet.certify.audit import VERSIONS, AuditResult, audit
from lipnet.export.runtime import atomic_write

#: What ``--out`` receives (an earlier run's are kept unless ``--overwrite``).
OUTPUTS = ("certify.json", "certified_accuracy.png")
#: The exit status after Ctrl-C, as a shell reports a process stopped by SIGINT.
INTERRUPTED = 130


def parse_eps(text: str) -> list[float]:
    """``"36/255,0.5"`` -> ``[0.1411..., 0.5]``; fractions and decimals, comma-separated, > 0."""
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(Fraction(item))
        except (ValueError, ZeroDivisionError, OverflowError):
            raise argparse.ArgumentTypeError(f"cannot read {item!r} as a radius: use numbers or fractions like "
                                             "36/255, separated by commas") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"radii must be finite and > 0, got {item!r}")
        values.append(value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lipnet.certify", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model checkpoint written by lipnet.checkpoint")
    parser.add_argument("--data", default=None, help="data set name (fashion-mnist, mnist, cifar10, cifar100; "
                                                     "default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="folder searched first for the data set")
    parser.add_argument("--download", action="store_true",
                        help="download the data set with torchvision into --data-dir when it is not found")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--eps", type=parse_eps, default=None,
                        help="L2 radii, comma-separated; fractions allowed (default: the radii the checkpoint's "
                             "recipe reported, else 36/255,72/255,108/255)")
    parser.add_argument("--limit", type=int, default=None, help="certify only the first N examples")
    parser.add_argument("--autoattack", action="store_true", help="audit the certificates with L2 AutoAttack")
    parser.add_argument("--attack-version", choices=sorted(VERSIONS), default="standard",
                        help="standard AutoAttack, or apgd (APGD-CE + APGD-T) for a quick check")
    parser.add_argument("--attack-limit", type=int, default=1000,
                        help="attack only the first N examples (default 1000; AutoAttack is slow)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 is often fastest on a busy machine)")
    parser.add_argument("--out", type=Path, default=None, help="folder for certify.json and certified_accuracy.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace certify.json and certified_accuracy.png already in --out (else refused)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--screening-alone", action="store_true",
                        help="compute the Gram layers' bounds as a GPU or compiled training step does (no refinement "
                             "of frequencies above the candidates' maximum on the CPU), so that a CPU certifies "
                             "exactly the function a model trained there computed (the default for checkpoints "
                             "that record it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lipnet.checkpoint import CheckpointError, load_model
    from lipnet.data import DatasetError, DatasetNotFoundError, load_dataset

    for name in ("limit", "attack_limit", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        return _fail(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return _fail(f"--out {args.out} exists and is not a folder")
    earlier = [name for name in OUTPUTS if args.out is not None and (args.out / name).exists()]
    if earlier and not args.overwrite:
        return _fail(f"--out {args.out} holds earlier results ({', '.join(earlier)}): choose another folder, or pass "
                     "--overwrite to replace them (nothing was overwritten)")
    try:
        model, info = load_model(args.checkpoint, map_location=device)
        if args.data is None:
            args.data = _recorded_dataset(info)
            if args.data is None:
                return _fail(f"--data is required: {args.checkpoint} does not record the data set it was trained on")
            print(f"note: certifying on {args.data!r}, the data set the checkpoint was trained on (see --data)",
                  file=sys.stderr)
        if args.eps is None:
            recorded = _recorded_eps(info)
            args.eps = recorded or list(DEFAULT_EPS)
            if recorded:
                print(f"note: certifying at the radii the checkpoint's recipe reported, {_format_radii(recorded)} "
                      "(see --eps)", file=sys.stderr)
        data = load_dataset(args.data, args.split, data_dir=args.data_dir, download=args.download)
    except (CheckpointError, DatasetError, DatasetNotFoundError, ValueError) as error:
        return _fail(str(error))
    screened = args.screening_alone or info.get("bounds_screened_alone") is True
    if screened and not args.screening_alone:
        print("note: this model's Gram bounds were screened alone in training (GPU or compiled); certifying that "
              "function (see --screening-alone)", file=sys.stderr)
    elif info.get("bounds_screened_alone") is False and not refines_exceeding(device):
        print(f"note: this model's Gram bounds were refined in training (CPU); on {device} they are screened alone, "
              "a slightly different function where spectra are flat: certify with --device cpu for the trained one",
              file=sys.stderr)
    try:
        with refine_exceeding(not screened):
            return _certify(args, model, info, data, device, screened)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was certified or written", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, TypeError, RuntimeError) as error:  # LipschitzBoundError is a ValueError
        return _fail(f"cannot certify {args.checkpoint} on {data.info.name}: {error}")


def _recorded_dataset(info: dict) -> str | None:
    """The data set a checkpoint of ``lipnet.training`` records (``info["dataset"]["name"]``)."""
    recorded = info.get("dataset")
    name = recorded.get("name") if isinstance(recorded, dict) else recorded
    return name if isinstance(name, str) and name else None


def _recorded_eps(info: dict) -> list[float] | None:
    """The radii a recipe's report used (``info["config"]["eval_eps"]``), if they are finite numbers
    ``>= 0`` (as ``TrainConfig`` takes them: 0 counts the correct predictions with a positive margin)."""
    config = info.get("config")
    eps = config.get("eval_eps") if isinstance(config, dict) else None
    if not (isinstance(eps, list) and eps):
        return None
    if not all(isinstance(e, int | float) and not isinstance(e, bool) and 0 <= e < math.inf for e in eps):
        return None
    return [float(e) for e in eps]


def _format_radii(eps: list[float]) -> str:
    return ", ".join(f"{e:.4g}" for e in eps)


def _certify(args, model, info, data, device, screened: bool) -> int:
    trained_on = _recorded_dataset(info)
    if trained_on is not None and trained_on != data.info.name:
        print(f"warning: the checkpoint was trained on {trained_on!r}, certifying on {data.info.name!r}",
              file=sys.stderr)
    images, labels = data.images, data.labels
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]

    start = time.perf_counter()
    result = certified_accuracy(model, (images, labels), args.eps, device=device, batch_size=args.batch_size,
                                progress=not args.no_progress)
    seconds = time.perf_counter() - start
    audits, interrupted = [], False
    try:
        if args.autoattack:
            _audit_each_radius(args, model, images, labels, device, audits)
    except KeyboardInterrupt:  # the certification is done: report it, with the radii audited so far
        interrupted = True
        print(f"interrupted (Ctrl-C) during the AutoAttack audit: reporting the certification and the "
              f"{len(audits)} radius/radii audited before", file=sys.stderr, flush=True)
    print(format_table(result, audits))
    summary = {"checkpoint": str(args.checkpoint), "data": data.info.name, "split": args.split,
               "split_size": len(data.labels), "limit": args.limit, "device": str(device),
               "screening_alone": screened, "seconds": seconds, **result.to_dict(),
               "autoattack": [a.to_dict() for a in audits], "autoattack_interrupted": interrupted}
    if args.out is not None:
        text = json.dumps(summary, indent=2) + "\n"
        try:  # each file appears whole or not at all; the summary last, once the plot is there
            args.out.mkdir(parents=True, exist_ok=True)
            plot_certified_accuracy(result, audits, args.out / "certified_accuracy.png",
                                    title=f"{Path(args.checkpoint).name} on {data.info.name} ({args.split})")
            atomic_write(args.out / "certify.json", lambda out: out.write(text.encode()))
        except OSError as error:
            return _fail(f"cannot write the results to --out {args.out}: {error}")
        print(f"wrote {args.out / 'certify.json'} and {args.out / 'certified_accuracy.png'}")
    failures = sum(a.n_failures for a in audits)
    if failures:
        print(f"SOUNDNESS FAILURE: AutoAttack broke {failures} certified prediction(s); see the warnings above",
              file=sys.stderr)
        return 1
    return INTERRUPTED if interrupted else 0


def format_table(result: CertificationResult, audits: list[AuditResult] = ()) -> str:
    """Plain-text table: one row per eps (certified, and AutoAttack robust accuracy if run)."""
    lines = [f"examples: {result.n}   clean accuracy: {100 * result.clean_accuracy:.2f}%   "
             f"Lipschitz bound: {result.lipschitz:.6f}"
             + (f" (body {result.body_lipschitz:.6f}, last-layer radius)" if result.body_lipschitz is not None else "")]
    normalized = [entry for entry in result.module_bounds if entry["normalized"]]
    if normalized:
        lowest = min(normalized, key=lambda entry: entry["lipschitz"])
        lines.append(f"Gram layers: {len(normalized)}, product of their bounds {math.prod(e['lipschitz'] for e in normalized):.6f}"
                     f" (lowest {lowest['lipschitz']:.6f}, {lowest['type']} '{lowest['module']}')")
    by_eps = {a.eps: a for a in audits}
    header = f"{'eps':>12} {'certified':>10}"
    if audits:
        header += f" | AutoAttack on the first {audits[0].n}: {'robust':>7} {'certified':>10} {'cert. broken':>12}"
    lines.append(header)
    pad = " " * len(f" | AutoAttack on the first {audits[0].n}:") if audits else ""
    for eps, certified in zip(result.eps, result.certified):
        row = f"{_eps_label(eps):>12} {100 * certified:>9.2f}%"
        a = by_eps.get(eps)
        if a is not None:
            row += f"{pad} {100 * a.robust_accuracy:>6.2f}% {100 * a.certified_accuracy:>9.2f}% {a.n_failures:>12}"
        lines.append(row)
    return "\n".join(lines)


def plot_certified_accuracy(result: CertificationResult, audits: list[AuditResult], path: Path,
                            title: str = "") -> None:
    """Certified accuracy against eps (PNG, matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The largest float64 stands for an unbounded radius (a logit gap that never changes), like inf.
    finite = result.radii[result.radii < torch.finfo(torch.float64).max]
    top = min(max([*result.eps, float(finite.max()) if finite.numel() else 0.0]) * 1.05, 1e300) or 1.0
    grid = torch.linspace(0, top, 400, dtype=torch.float64)
    curve = [(result.radii > e).double().mean().item() * 100 for e in grid]
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(grid.tolist(), curve, label="certified")
    ax.plot(result.eps, [100 * c for c in result.certified], "o", color="C0")
    if audits:
        ax.plot([a.eps for a in audits], [100 * a.robust_accuracy for a in audits], "x", color="C3", markersize=8,
                label=f"AutoAttack ({audits[0].version}, first {audits[0].n} examples)")
        ax.plot([a.eps for a in audits], [100 * a.certified_accuracy for a in audits], "o", color="C3",
                fillstyle="none", label=f"certified, first {audits[0].n} examples")
    ax.axhline(100 * result.clean_accuracy, color="gray", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("L2 radius eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    figure.tight_layout()
    atomic_write(path, lambda out: figure.savefig(out, format="png"))


def _eps_label(eps: float) -> str:
    steps = round(eps * 255)
    return f"{steps}/255" if steps % 255 and abs(steps / 255 - eps) < 1e-12 else f"{eps:.4g}"


def _audit_each_radius(args, model, images, labels, device, audits: list) -> None:
    """AutoAttack at each radius of ``args.eps``, appending to ``audits`` as each one ends."""
    x, y = images[:args.attack_limit], labels[:args.attack_limit]
    subset = certified_accuracy(model, (x, y), args.eps, device=device, batch_size=args.batch_size,
                                progress=False)
    for eps in args.eps:
        # One line before and after each radius: an audit takes minutes, and a log cut off by a
        # time limit keeps the radii already audited.
        print(f"AutoAttack ({args.attack_version}) at eps {eps:.6g}: attacking the correctly classified of the "
              f"first {len(y)} examples", file=sys.stderr, flush=True)
        started = time.perf_counter()
        audits.append(audit(model, x, y, eps, version=args.attack_version, certification=subset,
                            attack="correct", on_failure="warn", batch_size=min(args.batch_size, 250),
                            device=device))
        done = audits[-1]
        print(f"AutoAttack at eps {eps:.6g} ({', '.join(done.attacks) or 'no attack'}): {done.n_broken} of "
              f"{done.n_attacked} attacked broken within eps, {done.n_failures} certified point(s) broken "
              f"({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
