"""Certification: sound network Lipschitz bounds, certified radii and accuracy, AutoAttack audit.

* :func:`lipschitz_bound` composes certified per-module bounds into a float64 upper bound on
  the L2 Lipschitz constant of a network (unknown modules raise; register bounds with
  :func:`register_lipschitz_bound`). Beyond lipnet's layers it knows torch's activations
  (:mod:`~lipnet.certify.activation_bounds`), BatchNorm in eval mode
  (:mod:`~lipnet.certify.batch_norm_bound`), shuffles, padding and nearest upsampling
  (:mod:`~lipnet.certify.copy_map_bounds`).
* :func:`certified_radius` turns logits into certified L2 radii (generic or last-layer form,
  with a rounding margin on the logits).
* :func:`certified_accuracy` measures clean and certified accuracy over a data set.
* :func:`audit` attacks certified points with L2 AutoAttack: any break is a soundness failure.
* ``python -m lipnet.certify`` does all of it for a checkpoint (see :mod:`lipnet.certify.cli`).
"""

from lipnet.certify.accuracy import DEFAULT_EPS, CertificationResult, certified_accuracy, split_last_linear
from lipnet.certify.audit import AuditResult, SoundnessError, SoundnessWarning, audit
from lipnet.certify.lipschitz import (
    LipschitzBoundError,
    UnknownModuleError,
    lipschitz_bound,
    register_lipschitz_bound,
)
from lipnet.certify.radius import certified_radius, logit_rounding_margin

# Bounds of torch's activations, BatchNorm and copying maps, registered on import.
from lipnet.certify import activation_bounds, batch_norm_bound, copy_map_bounds  # noqa: F401

__all__ = [
    "DEFAULT_EPS",
    "AuditResult",
    "CertificationResult",
    "LipschitzBoundError",
    "SoundnessError",
    "SoundnessWarning",
    "UnknownModuleError",
    "audit",
    "certified_accuracy",
    "certified_radius",
    "lipschitz_bound",
    "logit_rounding_margin",
    "register_lipschitz_bound",
    "split_last_linear",
]
