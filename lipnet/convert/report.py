"""What :func:`~lipnet.convert.convert` changed, and what still keeps a model from a certificate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn


@dataclass(frozen=True)
class Change:
    """One module replaced by :func:`convert`: its path in the model, old and new ``repr``."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Obstacle:
    """A module that keeps the converted model from being certifiably 1-Lipschitz.

    Attributes:
        path: where it is in the model (``""`` for the model itself).
        module: its type, ``module.qualname``.
        problem: what is wrong, and its known Lipschitz bound where it has one.
        fix: the suggested 1-Lipschitz replacement, or ``None`` when lipnet has none.
        blocking: ``True`` when no sound bound can be computed at all (not even a loose one).
    """

    path: str
    module: str
    problem: str
    fix: str | None
    blocking: bool


@dataclass
class ConversionReport:
    """What :func:`convert` changed, and what still keeps the model from a 1-Lipschitz certificate.

    Attributes:
        changes: the replaced modules.
        obstacles: modules that are not certifiably 1-Lipschitz (blocking: no bound at all;
            non-blocking: a sound bound above 1 + 1e-4, which leaves room for the rounding margins
            of Gram layers' bounds, or a condition such as eval mode).
        notes: everything else worth knowing (modules left unchanged and why).
        registered: module types whose bound :func:`convert` registered with
            :func:`lipnet.certify.register_lipschitz_bound` (:func:`traced_lipschitz_bound`).
        lipschitz_bound: :func:`lipnet.certify.lipschitz_bound` of the converted model at
            conversion time (weights change in training: certify again after it), or ``None``.
        bound_error: why no bound could be computed (``None`` when it was, or when no
            ``input_shape`` was given).
    """

    changes: list[Change] = field(default_factory=list)
    obstacles: list[Obstacle] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    lipschitz_bound: float | None = None
    bound_error: str | None = None

    @property
    def certifiable(self) -> bool:
        """Whether :func:`lipnet.certify.lipschitz_bound` bounded the converted model."""
        return self.lipschitz_bound is not None

    def __str__(self) -> str:
        lines = [f"Converted {len(self.changes)} module(s):"]
        lines += [f"  {c.path or '<model>'}: {c.old} -> {c.new}" for c in self.changes]
        groups: dict[tuple, list[str]] = {}
        for o in self.obstacles:
            groups.setdefault((o.blocking, o.module, o.problem, o.fix), []).append(o.path or "<model>")
        if groups:
            lines.append(f"{len(self.obstacles)} module(s) keep the model from being certifiably 1-Lipschitz:")
        for (blocking, module, problem, fix), paths in groups.items():
            where = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
            lines.append(f"  [{'no bound' if blocking else 'bound > 1'}] {module} at {where}: {problem}")
            if fix:
                lines.append(f"      fix: {fix}")
        if self.registered:
            lines.append("Registered lipnet.convert.traced_lipschitz_bound for: " + ", ".join(self.registered))
        lines += [f"Note: {note}" for note in self.notes]
        if self.lipschitz_bound is not None:
            lines.append(f"Certified Lipschitz bound of the converted model, as converted: {self.lipschitz_bound:.6g}")
        elif self.bound_error is not None:
            lines.append(f"Not certifiable as converted: {self.bound_error}")
        return "\n".join(lines)


class Conversion(NamedTuple):
    """Result of :func:`convert`; unpacks as ``model, report = convert(...)``."""

    model: nn.Module
    report: ConversionReport
