"""Empirical audit of certificates with AutoAttack (L2).

A certificate says that no input within the certified radius changes the prediction. An
attack that finds such an input proves the certificate (hence the Lipschitz bound, a layer
or the radius formula) wrong. :func:`audit` attacks the correctly classified points,
recomputes every adversarial example's prediction and L2 distance itself, and counts the
*soundness failures*: points misclassified at a distance below their certified radius. As the
certificates, the predictions are those of the model in exact arithmetic: a point counts as a
failure only when the float64 evaluation with its proven error bound shows it misclassified
(a float32 pass may misclassify a point within rounding of a decision boundary).
It also reports the empirical robust accuracy (points not broken within ``eps``), which
can only be below the certified accuracy if some certified point was broken.

Reference:
    Croce, Hein. "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020 (AutoAttack; the ``pyautoattack`` package).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lipnet.certify.accuracy import CertificationResult, ExactLogits, certified_accuracy, model_input, resolve_device
from lipnet.certify.modes import evaluating, frozen
from lipnet.certify.precision import exact_kernels

#: Attacks of each audit version (the targeted ones need enough classes; see ``_attacks``).
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd": ("apgd-ce", "apgd-t"),
}


#: Relative slack on ``||x_adv - x|| <= eps`` for AutoAttack's float32 projection.
PROJECTION_TOLERANCE = 1e-5


class SoundnessError(AssertionError):
    """An attack broke a certified prediction: some certificate is false."""


class SoundnessWarning(UserWarning):
    """Warning form of :class:`SoundnessError` (``audit(..., on_failure="warn")``)."""


@dataclass
class AuditResult:
    """Outcome of :func:`audit` at one radius ``eps``.

    Attributes:
        eps: the attack radius (L2).
        version: ``"standard"`` AutoAttack or ``"apgd"`` (APGD-CE + APGD-T only).
        attacks: the attacks that ran, AutoAttack's names: ``version``'s, less those that do not
            apply (APGD-T with fewer than 4 classes; Square on inputs that are not images at least
            5 pixels high); empty when no point was attacked.
        n: examples audited.
        n_correct, n_certified: correctly classified, and certified at ``eps`` (radius ``> eps``).
        n_robust: correct points the attack did not break within ``eps`` (``None`` when only
            the certified points were attacked).
        n_attacked: points attacked.
        n_broken: attacked points misclassified at an L2 distance ``<= eps`` (up to
            :data:`PROJECTION_TOLERANCE`, but never beyond a point's certified radius).
        failures: indices of soundness failures (misclassified at a distance below their
            certified radius).
        failure_distances, failure_radii: their distances and certified radii.
    """

    eps: float
    version: str
    attacks: tuple[str, ...]
    n: int
    n_correct: int
    n_certified: int
    n_robust: int | None
    n_attacked: int
    n_broken: int
    failures: torch.Tensor = field(repr=False)
    failure_distances: torch.Tensor = field(repr=False)
    failure_radii: torch.Tensor = field(repr=False)

    @property
    def clean_accuracy(self) -> float:
        return self.n_correct / self.n

    @property
    def certified_accuracy(self) -> float:
        return self.n_certified / self.n

    @property
    def robust_accuracy(self) -> float | None:
        """Empirical robust accuracy; at least the certified accuracy when the audit is sound."""
        return None if self.n_robust is None else self.n_robust / self.n

    @property
    def n_failures(self) -> int:
        return int(self.failures.numel())

    @property
    def sound(self) -> bool:
        """No certified prediction was broken (which implies ``n_robust >= n_certified``)."""
        return self.n_failures == 0

    def to_dict(self) -> dict:
        return {
            "eps": self.eps, "version": self.version, "attacks": list(self.attacks), "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy, "robust_accuracy": self.robust_accuracy,
            "n_correct": self.n_correct, "n_certified": self.n_certified, "n_robust": self.n_robust,
            "n_attacked": self.n_attacked, "n_broken": self.n_broken, "n_certified_broken": self.n_failures,
            "sound": self.sound, "failures": self.failures.tolist(),
        }


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, version: str = "standard",
          certification: CertificationResult | None = None, attack: str = "correct",
          on_failure: str = "raise", batch_size: int = 250, device: torch.device | str | None = None,
          seed: int = 0) -> AuditResult:
    """Attack the model with L2 AutoAttack at radius ``eps`` and check the certificates.

    Args:
        model: maps inputs in ``[0, 1]`` (AutoAttack clips to that box) to logits.
        x, y: inputs (float in ``[0, 1]``, or uint8 images scaled by 1/255) and labels.
        eps: L2 attack radius.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"apgd"`` (APGD-CE and
            APGD-T: a quick check). APGD-T needs 4 classes and Square images ``(C, H, W)`` with
            ``H >= 5``; each is left out where it does not apply (``AuditResult.attacks``).
        certification: result of :func:`certified_accuracy` on exactly ``(x, y)``; computed
            if not given.
        attack: ``"correct"`` attacks every correctly classified point (gives the robust
            accuracy); ``"certified"`` only those certified at ``eps`` (faster).
        on_failure: ``"raise"`` a :class:`SoundnessError` or ``"warn"`` with a
            :class:`SoundnessWarning` when a certified point is broken.
        batch_size, device, seed: passed to AutoAttack.

    Parameters are frozen (``requires_grad=False``) and the model is in eval mode during
    the attack, so Gram layers use their cached normalized weights; both are restored. The
    attack takes gradients, so the audit runs outside a caller's ``torch.inference_mode()``
    (and the caller's random state is restored after AutoAttack's seeding).
    """
    # Under inference mode AutoAttack's gradients failed ("element 0 of tensors does not require grad").
    with torch.inference_mode(False):
        return _audit(model, x, y, eps, version=version, certification=certification, attack=attack,
                      on_failure=on_failure, batch_size=batch_size, device=device, seed=seed)


def _is_number(value) -> bool:
    """A real number of one element (``float``, ``Fraction``, a 0-d tensor or numpy array)."""
    if isinstance(value, numbers.Real):
        return True
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a complex tensor
        return False
    return (value.numel() if torch.is_tensor(value) else getattr(value, "size", 1)) == 1


def _audit(model, x, y, eps, *, version, certification, attack, on_failure, batch_size, device, seed) -> AuditResult:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {sorted(VERSIONS)}, got {version!r}")
    if attack not in ("correct", "certified"):
        raise ValueError(f"attack must be 'correct' or 'certified', got {attack!r}")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
    if isinstance(eps, str | bytes | bool | list | tuple) or not _is_number(eps):
        raise TypeError(f"eps must be one radius (a number), got {eps!r}; audit attacks at one radius per call (call "
                        "it once per radius, as the CLI does)")
    if not isinstance(eps, numbers.Real):  # a 0-d tensor or array: its value
        eps = float(eps)
    if not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite radius > 0, got {eps}")
    device = resolve_device(model, device)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != x.shape[:1]:
        raise ValueError(f"y must hold {x.shape[0]} integer labels, got {y.dtype} {tuple(y.shape)}")
    x, y = x.detach().float().cpu(), y.detach().cpu().long()
    if x.is_inference():  # made under inference mode: a copy autograd can use
        x = x.clone()
    if x.shape[0] == 0:
        raise ValueError("x holds no inputs: nothing to audit")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("AutoAttack clips inputs to [0, 1], but x lies in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; put the input normalization inside the model")
    if certification is None:
        certification = certified_accuracy(model, (x, y), [eps], device=device, progress=False)
    elif certification.n != x.shape[0]:
        raise ValueError(f"certification covers {certification.n} examples but x has {x.shape[0]}")
    radii = certification.radii.double().cpu()
    targets = certification.correct if attack == "correct" else radii > eps
    index = targets.nonzero().flatten()

    attacked = _FloatLogits(model)
    with evaluating(model), frozen(model):
        if index.numel():
            x_adv, attacks = _run_autoattack(attacked, x[index], y[index], eps, version, batch_size, device, seed)
        else:
            x_adv, attacks = x[index], ()
        misclassified, provably = _exact_misclassification(model, x_adv, y[index], batch_size, device)

    # Distances between the inputs as the model sees them (its dtype), as certified.
    distances = (model_input(x_adv, attacked.dtype).double() - model_input(x[index], attacked.dtype).double()
                 ).flatten(1).norm(dim=1)
    unsound = provably & (distances < radii[index])
    # AutoAttack projects onto the eps-sphere in float32: allow that rounding, except where it
    # would carry a certified point past its radius (then the break is outside the certificate).
    within_eps = distances <= eps * (1 + PROJECTION_TOLERANCE)
    broken = misclassified & within_eps & ((radii[index] <= eps) | unsound)
    n_correct = int(certification.correct.sum())
    result = AuditResult(
        eps=float(eps),
        version=version,
        attacks=attacks,
        n=x.shape[0],
        n_correct=n_correct,
        n_certified=int((radii > eps).sum()),
        n_robust=n_correct - int(broken.sum()) if attack == "correct" else None,
        n_attacked=int(index.numel()),
        n_broken=int(broken.sum()),
        failures=index[unsound],
        failure_distances=distances[unsound],
        failure_radii=radii[index][unsound],
    )
    if not result.sound:
        _report(result, on_failure)
    return result


def _exact_misclassification(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                             device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the model in exact arithmetic (as certified: :class:`~lipnet.certify.accuracy.ExactLogits`)
    misclassifies each input: by its float64 prediction, and provably (another logit above the
    label's by more than twice their error bound). A float32 forward pass may misclassify an input
    within rounding of a decision boundary that the exact model, whose certificates these are,
    classifies right."""
    misclassified, provably = [], []
    with torch.no_grad(), exact_kernels():
        exact = ExactLogits(model, last_layer="none")
        for start in range(0, x.shape[0], batch_size):
            labels = y[start:start + batch_size].to(device)
            logits, rounding = exact(x[start:start + batch_size].to(device))
            own = logits.gather(1, labels[:, None].long())[:, 0]
            others = logits.scatter(1, labels[:, None].long(), -math.inf).amax(dim=1)
            misclassified.append((logits.argmax(dim=1) != labels).cpu())
            provably.append((others - own > 2 * rounding).cpu())
    empty = torch.zeros(0, dtype=torch.bool)
    return torch.cat([empty, *misclassified]), torch.cat([empty, *provably])


class _FloatLogits(nn.Module):
    """The model on float32 inputs (AutoAttack's dtype), cast to the model's dtype and back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _attacks(version: str, n_classes: int, example_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The attacks of ``version`` that apply to ``n_classes`` and inputs of ``example_shape``: the
    targeted DLR loss of APGD-T needs 4 classes; Square's L2 initialization tiles images ``(C, H, W)``
    with squares of side ``H // 5`` (it fails on vectors and on images under 5 pixels high)."""
    attacks = VERSIONS[version]
    if n_classes < 4:
        attacks = tuple(a for a in attacks if a != "apgd-t")
    if len(example_shape) != 3 or example_shape[1] < 5:
        attacks = tuple(a for a in attacks if a != "square")
    return attacks


def _run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str,
                    batch_size: int, device, seed: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Adversarial examples of ``x`` and the names of the attacks that made them."""
    from pyautoattack import AutoAttack  # imported here: ``import lipnet`` does not need it

    with torch.no_grad():
        n_classes = model(x[:1].to(device)).shape[1]
    attacks = _attacks(version, n_classes, tuple(x.shape[1:]))
    adversary = AutoAttack(model, norm="L2", eps=float(eps), version="custom", seed=seed, device=device,
                           attacks=list(attacks))
    # The settings of AutoAttack's standard L2 version, with as many targets as there are classes.
    adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = min(9, n_classes - 1)
    adversary.fab.n_restarts = 1
    adversary.fab.n_target_classes = min(9, n_classes - 1)
    adversary.square.n_queries = 5000
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    # AutoAttack seeds torch's global generators (torch.manual_seed(seed), and CUDA's) at each attack:
    # the caller's random state is put back afterwards.
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        x_adv = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)[0]
    return x_adv.detach().float().cpu(), attacks


def _cuda_devices(device) -> list[int]:
    """The CUDA devices whose generators AutoAttack may reseed: ``device``'s, and every one once CUDA is
    initialized (it seeds the current device's whatever ``device`` is)."""
    device = torch.device(device)
    if not (device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())):
        return []
    return list(range(torch.cuda.device_count()))


def _report(result: AuditResult, on_failure: str) -> None:
    worst = ", ".join(f"#{int(i)} at distance {float(d):.6g} < radius {float(r):.6g}"
                      for i, d, r in zip(result.failures[:5], result.failure_distances[:5], result.failure_radii[:5]))
    message = (
        f"SOUNDNESS FAILURE at eps={result.eps:.6g}: AutoAttack ({result.version}) broke {result.n_failures} "
        f"certified prediction(s) ({worst}); {result.n_certified} of {result.n} points were certified, "
        f"{result.n_robust} survived the attack. Some Lipschitz bound in the model is wrong: check custom layers "
        "and registered bounds (lipnet.certify.register_lipschitz_bound)."
    )
    if on_failure == "raise":
        raise SoundnessError(message)
    warnings.warn(message, SoundnessWarning, stacklevel=4)  # _report, _audit, audit, its caller
