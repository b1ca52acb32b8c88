"""The modules that keep a converted model from being certifiably 1-Lipschitz, and their fixes."""

from __future__ import annotations

from torch import nn

from lipnet.certify import LipschitzBoundError, UnknownModuleError
from lipnet.certify.lipschitz import module_output_lipschitz_bound, split_plain_last_linear
from lipnet.certify.lipschitz import _REGISTRY, _lookup, call_registered_bound
from lipnet.convert.graph import _SUMS, _depends_on_input, _key, _tensor_args, _trace
from lipnet.convert.replacement import _GRAM_LAYERS, _LINEAR, _inside, _parametrizations, _qualname
from lipnet.convert.report import ConversionReport, Obstacle
from lipnet.convert.traced_bound import _traced_bound
from lipnet.nn.activations import GroupSort, MaxMin
from lipnet.nn.pooling import pooling_lipschitz_bound
from lipnet.nn.residual import ConvexResidual, GramResidualConv2d
from lipnet.nn.sequential import GramSequential

_POOL_FIX = ("lipnet.nn.L2NormPool2d(k) or lipnet.nn.ScaledAvgPool2d(k), stride k (non-overlapping windows: "
             "1-Lipschitz), e.g. replace={nn.MaxPool2d: lambda m: L2NormPool2d(2)}")
_RESIDUAL_FIX = ("lipnet.nn.GramResidualConv2d (bounds I + conv itself: 1-Lipschitz) or lipnet.nn.ConvexResidual "
                 "((1 - a) x + a f(x): 1-Lipschitz when f is)")
_ATTENTION = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
              nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_ATTENTION_PROBLEM = "dot-product attention is not Lipschitz (Kim, Papamakarios, Mnih, ICML 2021)"

#: Activations with a bound in lipnet.certify that depends on the module alone (may exceed 1, or be refused).
_BOUNDED_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.CELU, nn.SELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.PReLU, nn.RReLU, nn.Threshold, nn.Hardshrink)
_ACTIVATION_FIX = "lipnet.nn.MaxMin (convert(..., activation='maxmin') replaces nn.ReLU only)"
#: Modules whose bound training changes without constraint: reported even while it is at most 1.
_UNCONSTRAINED = (nn.modules.batchnorm._BatchNorm,)
#: ``(types, problem, fix)``: what is known to be wrong with a module type, and the way out.
_ADVICE = (
    (nn.modules.batchnorm._BatchNorm,
     "scales each channel by weight / sqrt(running_var + eps), a factor that training leaves unconstrained, and "
     "normalizes by batch statistics in train mode",
     "remove it: Gram layers need no normalization (replace={nn.BatchNorm2d: lambda m: nn.Identity()}); to keep a "
     "pretrained scale, fold it into the previous convolution before converting "
     "(torch.nn.utils.fusion.fuse_conv_bn_eval)"),
    ((nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm),
     "divides by a statistic of its input, which is not Lipschitz near zero variance",
     "remove it (replace={<its type>: lambda m: nn.Identity()})"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d, nn.LPPool1d, nn.LPPool2d),
     "pooling that is not 1-Lipschitz (overlapping windows put inputs in several windows)", _POOL_FIX),
    (_ATTENTION, _ATTENTION_PROBLEM, None),
    (_BOUNDED_ACTIVATIONS, "an activation that is not 1-Lipschitz", _ACTIVATION_FIX),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU), "an activation with no bound in lipnet.certify",
     _ACTIVATION_FIX),
    ((nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.Bilinear, nn.Embedding),
     "a linear layer that lipnet has no Gram normalization for", None),
)
#: lipnet and torch modules that are 1-Lipschitz by construction (exact types: a subclass may
#: change the forward, and is checked against lipnet.certify instead).
_ONE_LIPSCHITZ_MODULES = (*_GRAM_LAYERS, GramResidualConv2d, MaxMin, GroupSort, nn.ReLU, nn.Identity, nn.Flatten)

#: 1-Lipschitz types that lipnet.certify refuses where they act on the batch dimension
#: (``nn.Flatten(0, ...)``, ``MaxMin(dim=0)``, ``GroupSort(k, dim=0)``): checked like the others.
_MAY_ACT_ON_THE_BATCH = (nn.Flatten, MaxMin, GroupSort)

#: Bounds up to this count as 1: a Gram layer's certified bound is 1 times ``1 +`` its float64
#: rounding margin (at least ``MIN_RELATIVE_MARGIN = 1e-6``, more for very wide layers), rounded up
#: in the layer's dtype; the report is a diagnosis, the certificate uses the bound itself.
_ONE = 1 + 1e-4
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _above_one(bound: float) -> str:
    """A bound above :data:`_ONE` in 4 significant digits, or 7 where 4 would print 1."""
    return f"{bound:.4g}" if f"{bound:.4g}" != "1" else f"{bound:.7g}"


def _diagnose(model: nn.Module, shapes, report: ConversionReport) -> None:
    """Add an :class:`Obstacle` for every module that is not certifiably 1-Lipschitz.

    With ``shapes`` (an ``input_shape`` was given), each module called in the forward pass
    is checked against :func:`lipnet.certify.lipschitz_bound` for the input shape it sees:
    an error is a blocking obstacle, a bound above 1 a non-blocking one. Containers with
    their own forward are traced for residual sums. Without shapes, known problem types
    are reported from their type alone.
    """
    opaque = _parametrizations(model)
    split = split_plain_last_linear(model)
    plain_last = split[1] if split is not None else None
    for path, module in model.named_modules():
        if _inside(path, opaque):
            continue
        if isinstance(module, _LINEAR + _ATTENTION) or callable(getattr(module, "lipschitz_bound", None)):
            opaque.append(path)  # analysed as a whole
        if module is plain_last:  # lipschitz_bound bounds it (certified_accuracy reads its rows)
            report.obstacles.append(Obstacle(
                path, _qualname(module), "an unnormalized last linear layer: certified with the float64 bound of its "
                "weight, so the model is not 1-Lipschitz by construction", "lipnet.nn.GramLinear", blocking=False))
            continue
        obstacle = _obstacle(path, module, shapes)
        if obstacle is not None:
            report.obstacles.append(obstacle)


def _obstacle(path: str, module: nn.Module, shapes) -> Obstacle | None:
    name = _qualname(module)
    if type(module) in _ONE_LIPSCHITZ_MODULES and not isinstance(module, _MAY_ACT_ON_THE_BATCH):
        return None
    if isinstance(module, _DROPOUT):
        if not module.training:
            return None
        return Obstacle(path, name, "random in train mode: certificates hold for the eval-mode model (lipnet.certify "
                        "evaluates in eval mode, where dropout is the identity)", "call model.eval() before "
                        "certifying", blocking=False)
    if isinstance(module, _LINEAR):
        return Obstacle(path, name, "an unnormalized linear layer (see the notes for why it was not converted)",
                        "lipnet.nn.GramConv2d / lipnet.nn.GramConv1d / lipnet.nn.GramConvTranspose2d / "
                        "lipnet.nn.GramLinear", blocking=True)
    if _is_custom_container(module):
        return _container_obstacle(path, module, shapes)
    if isinstance(module, (nn.Sequential, ConvexResidual)) or type(module).__name__ == "InputNormalization":
        return None  # composed from their children / a bound > 1 by design (certificates in pixel space)
    problem, fix = next(((p, f) for types, p, f in _ADVICE if isinstance(module, types)), (None, None))
    calls = shapes.get(id(module)) if shapes is not None else None
    if calls is None and (shapes is not None or problem is None):
        return None  # not called by the forward pass / nothing known from the type alone
    try:
        if calls is not None:
            bound = max(module_output_lipschitz_bound(module, shape[1:]) for shape in calls)
        elif (bound := _bound_from_module(module)) is None:
            return Obstacle(path, name, problem, fix, blocking=True)
    except LipschitzBoundError as error:
        reason = "" if isinstance(error, UnknownModuleError) or problem is None else f" ({error.reason})"
        return Obstacle(path, name, (problem or f"lipnet.certify has no Lipschitz bound for it ({error.reason})") +
                        reason, fix or "replace it by a lipnet layer, or register a sound bound with "
                        "lipnet.certify.register_lipschitz_bound", blocking=True)
    if isinstance(module, _UNCONSTRAINED):
        return Obstacle(path, name, f"{problem}: Lipschitz bound {bound:.4g} with its current values, which training "
                        "may raise above 1", fix, blocking=False)
    if bound > _ONE:
        return Obstacle(path, name, f"{problem + ': ' if problem else ''}Lipschitz bound {_above_one(bound)}, not 1",
                        fix, blocking=False)
    return None


def _bound_from_module(module: nn.Module) -> float | None:
    """The bound of a module whose bound does not depend on its input's shape (max pooling,
    BatchNorm, the activations of :data:`_BOUNDED_ACTIVATIONS`), or ``None`` for the others;
    raises :class:`LipschitzBoundError` when lipnet.certify refuses it."""
    if isinstance(module, nn.MaxPool2d):
        return pooling_lipschitz_bound(module.kernel_size, module.stride, module.dilation)
    if isinstance(module, _BOUNDED_ACTIVATIONS + _UNCONSTRAINED):
        bound = _lookup(_REGISTRY, module)
        if bound is None:  # a subclass with its own forward
            raise UnknownModuleError(module)
        return call_registered_bound(bound, module, ())
    return None


def _is_custom_container(module: nn.Module) -> bool:
    """A module with children whose bound lipnet.certify cannot derive from theirs by itself."""
    if not any(True for _ in module.children()) or callable(getattr(module, "lipschitz_bound", None)):
        return False
    for known in (GramSequential, nn.Sequential, ConvexResidual):  # most derived first
        if isinstance(module, known):
            return type(module).forward is not known.forward
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _container_obstacle(path: str, module: nn.Module, shapes) -> Obstacle | None:
    """A container with its own forward: its residual sums, or why it cannot be analysed."""
    name = _qualname(module)
    if isinstance(module, _ATTENTION):
        return Obstacle(path, name, _ATTENTION_PROBLEM, None, blocking=True)
    try:
        graph = _trace(module).graph
    except Exception as error:
        return Obstacle(path, name, f"its forward cannot be traced by torch.fx ({type(error).__name__}: {error}), so "
                        "how it combines its children is unknown", "register a sound bound with "
                        "lipnet.certify.register_lipschitz_bound, or rebuild it from lipnet containers", blocking=True)
    sums = [node for node in graph.nodes
            if _key(node) in _SUMS and sum(_depends_on_input(a) for a in _tensor_args(node)) > 1]
    calls = shapes.get(id(module)) if shapes is not None else None
    own = 1.0  # the bound of its forward's own operations, children counted as 1-Lipschitz
    if calls:
        # Check the operations of its forward only: children get bound 1 here (they are diagnosed on their own).
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            own = max(_traced_bound(module, shape[1:], child_bound=lambda child, shape: 1.0)
                      for shape in dict.fromkeys(calls))
        except LipschitzBoundError as error:
            return Obstacle(path, name, f"its Lipschitz bound cannot be derived from its forward: {error.reason}",
                            "register a sound bound with lipnet.certify.register_lipschitz_bound, or rebuild it "
                            "from lipnet containers", blocking=True)
        finally:
            for m, training in modes.items():
                m.train(training)
    if sums:
        return Obstacle(path, name, f"adds {len(sums)} pair(s) of branches computed from its input (a residual "
                        "connection): a sum is bounded by the sum of the branches' bounds, x + f(x) by 1 + Lip(f), "
                        "2 for a 1-Lipschitz f, so k such blocks in a row can give 2^k" +
                        (f"; its forward's bound with 1-Lipschitz children is {own:.4g}" if calls else ""),
                        _RESIDUAL_FIX, blocking=False)
    if own > _ONE:
        return Obstacle(path, name, f"its forward scales or copies values (constant factors, concatenations of a "
                        f"value with itself): Lipschitz bound {_above_one(own)} with 1-Lipschitz children, not 1",
                        "scale by factors of at most 1, and concatenate distinct values (or divide their copies by "
                        "sqrt(number of copies))", blocking=False)
    return None
