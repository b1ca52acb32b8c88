"""Lipschitz bounds of containers with their own forward, from their ``torch.fx`` graphs, and the
rounding error of their float64 pass."""

from __future__ import annotations

import torch
from torch import nn

from lipnet.certify import LipschitzBoundError
from lipnet.certify.lipschitz import (
    check_input_shape,
    check_no_forward_hooks,
    check_runs_own_forward,
    module_output_lipschitz_bound,
)
from lipnet.certify.model_state import ModelState
from lipnet.certify.precision import UNIT_ROUNDOFF, example_norms, underflow_bound
from lipnet.convert.attribute_writes import _AttributeWrites
from lipnet.convert.bound_interpreter import _BoundInterpreter
from lipnet.convert.graph import _trace
from lipnet.export.exporter import example_input


def traced_lipschitz_bound(module: nn.Module, input_shape) -> float:
    """Sound Lipschitz bound of a module with its own ``forward``, from its ``torch.fx`` graph.

    The forward is traced with every child as a leaf, run in eval mode on batches of sizes 2
    and 3 (to see which operations keep the batch dimension) and 1 (where ``contiguous()`` or a
    reshape may return its input, and ``squeeze()`` drop the batch), and each node ``v`` gets a
    bound ``L(v)`` on the Lipschitz constant of its value as a function of the input:

    * input: 1; constants (parameters read directly, shapes): 0;
    * child ``m`` applied to ``u``: ``lipschitz_bound(m, shape of u) * L(u)``;
    * ``u + w``, ``u - w``: ``L(u) + L(w)`` (triangle inequality; no broadcasting of a
      non-constant operand, which would copy entries; ``alpha`` as applied, like the factors below);
    * ``c * u``, ``u / c`` with ``c`` a constant number or tensor: ``max|c| L(u)``,
      ``L(u) / min|c|`` (not a number read from the input's shape, such as its batch size;
      ``c`` as it was before the product, which ``c.mul_(u)`` overwrites, and as the product
      applies it, cast to its dtype and to float32 for half precisions);
    * ReLU, tanh, hardtanh, negation, eval-mode dropout: ``L(u)``;
    * per-example rearrangements (flatten, view, reshape, permute, transpose, squeeze,
      unsqueeze, contiguous, clone) and selections (chunk, split and unbind along a non-batch
      dimension, basic slicing): ``L(u)``, provided every tensor involved keeps the batch as
      its first dimension, and no size or dimension they are given is computed from the batch
      size (it may be given as read, ``x.shape[0]``, ``x.size(0)`` or ``x.shape``, as the first
      size of a view or reshape: ``(x.shape[0] - 1) % 3 + 1`` is the batch size at the traced
      batches only);
    * concatenation along a non-batch dimension: ``sqrt(sum L(u_i)^2)``.

    Any other operation raises :class:`~lipnet.certify.LipschitzBoundError`; so do a
    rearrangement given anything but sizes and dimensions (``view(dtype)`` reinterprets bits),
    a write into the input, a parameter, a buffer or an attribute (``out=``, in-place methods,
    ``resize_``), an in-place operation on a value used elsewhere or on a tensor whose memory a
    value read later shares (``contiguous()``, ``nn.Identity`` and no-op reshapes return their
    input), reading a value after anything changed it in place, a module with forward hooks
    or a ``forward`` assigned to the instance (the graph is the class's forward, without them),
    a forward that assigns attributes of the module or of its children (the graph freezes the
    Python values the forward reads: a flag a child sets from its input, a call counter), and a
    graph that does not reproduce the module's output. All float arithmetic rounds upwards.

    The graph holds the forward's tensor operations only: Python values it reads (attributes,
    globals) are those at tracing, and the graph is compared with the forward on three batches
    here, and on the inputs certified by the certification pass (``propagate_rounding``). A
    Python value that only other inputs would change (a flag a child sets for inputs above
    some size) is not caught.

    Args:
        module: e.g. a torchvision ``BasicBlock``.
        input_shape: shape of one input without the batch dimension.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        return _traced_bound(module, check_input_shape(input_shape))
    finally:
        for m, training in modes.items():
            m.train(training)


def _traced_bound(module: nn.Module, input_shape: tuple[int, ...], child_bound=module_output_lipschitz_bound) -> float:
    """:func:`traced_lipschitz_bound` in eval mode; ``child_bound(child, shape)`` bounds the leaves."""
    # torch.fx traces the class's forward, without hooks; the module must compute exactly that
    # (the check of the graph against the forward tolerates differences of 1e-6).
    check_no_forward_hooks(module)
    check_runs_own_forward(module)
    try:
        # In both grad modes: a branch on torch.is_grad_enabled() would otherwise never be bounded
        # (certification runs without gradients, a plain call of the model with them).
        with torch.no_grad():
            traced = _trace(module)
        with torch.enable_grad():
            with_gradients = _trace(module)
    except Exception as error:
        raise LipschitzBoundError(module, f"its forward cannot be traced by torch.fx ({type(error).__name__}: "
                                          f"{error}); register a bound with lipnet.certify.register_lipschitz_bound"
                                  ) from error
    if traced.code != with_gradients.code:
        raise LipschitzBoundError(module, "its forward traces to another graph with gradients enabled than without "
                                          "(a branch on torch.is_grad_enabled(), or state that each call changes), "
                                          "and a bound would hold for one of them only; compute the same function "
                                          "in both modes, without side effects")
    cache: dict = {}
    writes = _AttributeWrites(module)

    def cached_child_bound(child, shape):
        key = (id(child), shape)
        if key not in cache:
            with writes.paused():  # (lipschitz_bound sets and restores the children's training flags)
                cache[key] = child_bound(child, shape)
        return cache[key]

    bounds = {}
    # Batch 1 last: there operations may return their input (contiguous() of x[:, 1:2], a reshape
    # that is a view only when the batch has one example), so an in-place write may reach a value
    # read later, and squeeze() may take the batch away. Its bound is checked, not used.
    for batch in (2, 3, 1):
        run = _BoundInterpreter(traced, module, batch, cached_child_bound)
        x = example_input(module, input_shape, batch=batch, seed=batch)
        state = ModelState(module, traced)
        with torch.no_grad(), writes.watching():
            out = run.run(x.clone())  # first: it refuses a write into the module's state before the forward makes it
            try:
                expected = module(x.clone())
            except RuntimeError as error:  # e.g. an in-place write torch refuses once a reshape is a view
                raise LipschitzBoundError(module, (
                    f"its forward raises on a batch of {batch} ({type(error).__name__}: {error}); a certificate "
                    "holds for every batch size, so the forward must run on each")) from error
        _check_state_kept(module, state)
        if not (torch.is_tensor(out) and torch.is_tensor(expected) and out.shape == expected.shape
                and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)):
            raise LipschitzBoundError(module, "the torch.fx graph of its forward does not reproduce its output "
                                              "(in-place operations on shared tensors?); register a bound with "
                                              "lipnet.certify.register_lipschitz_bound")
        bounds[batch] = run.result
    return bounds[3]


def _check_state_kept(module: nn.Module, state: ModelState) -> None:
    """Refuse a forward that changed the module's tensors or settings, or a tensor of its graph's
    (a global the forward reads): torch.fx records no write it makes outside the graph
    (``self.s.mul_(2)`` on a buffer, a write through ``.numpy()``), so each call would compute
    another function than the one bounded."""
    if not state.unchanged():
        raise LipschitzBoundError(module, (
            "its forward changes its own state (a parameter, buffer, tensor attribute or global tensor written in "
            "place, or a setting assigned), so each call computes another function than the one bounded; keep "
            "the forward free of side effects"))


def _traced_rounding(module: nn.Module, h: torch.Tensor, err: torch.Tensor, bounds: dict, propagate):
    """``(module(h), e)``: the float64 output of a module bounded by :func:`traced_lipschitz_bound`
    and a per-example bound ``e`` on its L2 distance to the exact output, node by node.

    A traced forward need not be one sum of products (``(x + c) - c`` with a large constant
    ``c`` loses the digits of ``x``), so the rounding allowance of
    :mod:`lipnet.certify.precision` for a module as a whole does not hold for it. The graph must
    compute exactly what the forward computes on ``h``, assigning no attribute (see
    :class:`_AttributeWrites`): a Python value it froze (a flag a child sets for large inputs
    only) would make the logits certified differ from the model's. Each node then adds its own
    rounding: children through ``propagate`` (the certification pass itself), and an
    elementwise node with Lipschitz factors ``f_i`` on operands ``a_i`` and value ``y`` adds at most
    ``4 u (sum f_i ||a_i|| + ||y||)`` to ``sum f_i e(a_i)``, and the underflow of its products
    (:func:`~lipnet.certify.precision.underflow_bound` of its ``numel(y)`` outputs and operands:
    ``x / 64`` rounds ``2^-1070`` to 0, which a later layer may scale by ``2^1023``);
    rearrangements and concatenations are exact (the latter sums its parts' errors)."""
    traced = _trace(module)
    writes = _AttributeWrites(module)

    def child_bound(child, shape):
        found = bounds.get((id(child), shape))
        if found is not None:
            return found
        with writes.paused():
            return module_output_lipschitz_bound(child, shape)

    run = _BoundInterpreter(traced, module, len(h), child_bound, keep_values=True)
    state = ModelState(module, traced)
    with torch.no_grad(), writes.watching():
        y = run.run(h)
        expected = module(h.clone())
    _check_state_kept(module, state)
    if not (torch.is_tensor(expected) and torch.equal(y, expected)):
        raise LipschitzBoundError(module, "its forward computes other values than its torch.fx graph on the inputs "
                                          "being certified (a Python value the graph froze, such as an attribute set "
                                          "for some inputs only); the bound and the logits describe the graph, not "
                                          "the forward")
    errors: dict = {}
    for node in traced.graph.nodes:
        if node.op == "output":
            return y, errors[node.args[0]]
        kind, *parts = run.rule[node]
        if kind == "input":
            errors[node] = err
        elif kind == "constant":
            errors[node] = torch.zeros_like(err)
        elif kind == "child":
            child, first = parts
            errors[node] = propagate(child, run.env[first], errors[first], bounds)[1]
        elif kind == "linear":
            (terms,) = parts
            total = sum(factor * errors[a] for a, factor in terms)
            size = sum(factor * example_norms(run.env[a]) for a, factor in terms) + example_norms(run.env[node])
            errors[node] = total + 4 * UNIT_ROUNDOFF * size + underflow_bound(run.env[node][0].numel() + len(terms))
        elif kind == "exact":
            errors[node] = errors[parts[0]]
        else:  # "cat": the parts' errors summed (>= their L2 combination, whose squares underflow for tiny errors)
            (pieces,) = parts
            total = sum((errors[p] for p in pieces), torch.zeros_like(err))
            errors[node] = total * (1 + 4 * UNIT_ROUNDOFF * (len(pieces) + 1))
    raise LipschitzBoundError(module, "its graph has no output")


traced_lipschitz_bound.propagate_rounding = _traced_rounding
