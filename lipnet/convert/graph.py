"""The ``torch.fx`` graph of one module's own forward, and what its nodes read and write."""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

import lipnet.nn
import lipnet.nn.activations
from lipnet.nn.activations import group_sort, max_min


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Trace one module's own forward: every submodule call is a leaf, and so is every call of
    lipnet's functional sorting activations (:data:`_SORTS`), whether the forward's module imported
    them or calls them as attributes of the packages that export them (``lipnet.nn.max_min``)."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(_SORTS))
        # torch.fx patches these functions, while it traces, in the forward's globals and in the
        # dictionaries of the modules listed here (its autowrap_modules argument would also add
        # every other public callable of those modules, the layer classes included).
        self._autowrap_search.extend(_SORT_MODULES)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """The graph of ``module.forward`` with its children as leaves, as a ``GraphModule``; extra
    arguments take their defaults. torch.fx stores the tensors the forward creates as attributes
    of the module it traces (``_tensor_constant0``, ...): they are copied into the GraphModule
    and removed from the module, which would otherwise gain one per trace."""

    parameters = list(inspect.signature(module.forward).parameters.values())
    if not parameters or parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError("forward must take the input tensor as its first argument")
    concrete = {}
    for p in parameters[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"forward takes a second required argument {p.name!r}: only one input is supported")
        concrete[p.name] = p.default
    before = set(vars(module))
    try:
        traced = torch.fx.GraphModule(module, _ChildrenAsLeaves().trace(module, concrete_args=concrete or None))
    finally:
        created = set(vars(module)) - before
        for name in created:
            delattr(module, name)
    traced.created_attributes = frozenset(created)
    return traced


_SUMS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
_SCALINGS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv, operator.itruediv, torch.div,
             "div", "div_"}
#: 1-Lipschitz for real values; the linear ones (negation, inactive dropout) for complex values too.
_LINEAR_ONE_LIPSCHITZ = {operator.neg, torch.neg, "neg", F.dropout}
_ONE_LIPSCHITZ = {torch.relu, F.relu, "relu", "relu_", torch.tanh, F.tanh, "tanh", F.hardtanh, *_LINEAR_ONE_LIPSCHITZ}
_REARRANGEMENTS = {torch.flatten, "flatten", "view", "reshape", torch.reshape, "permute", torch.permute,
                   "transpose", torch.transpose, "contiguous", "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze,
                   "clone"}
_SPLITS = {torch.chunk, "chunk", torch.split, "split", torch.unbind, "unbind"}
#: Sorting activations: a permutation of the entries along a channel dimension, so 1-Lipschitz and
#: exact in floating point; the position of that dimension among their arguments.
_SORTS = {max_min: 1, group_sort: 2}
#: The packages that export the sorting activations as attributes.
_SORT_MODULES = (lipnet.nn, lipnet.nn.activations)
_CATS = {torch.cat, torch.concat}
#: Elementwise operations: applied to constants that are the same for every example, they give such constants.
_ELEMENTWISE = _SUMS | _SCALINGS | (_ONE_LIPSCHITZ - {F.dropout}) | {"to"}
#: Factories whose first argument (or ``size=``) is a size: a shape passed there sets no value.
_FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty}
_SHAPE_METHODS = ("size", "dim", "numel")
_SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device")


def _key(node: torch.fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _is_sum(node: torch.fx.Node) -> bool:
    return _key(node) in _SUMS


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _depends_on_input(node: torch.fx.Node) -> bool:
    """Whether a node's value can depend on the values of the graph's input."""
    return _reaches_input(node, lambda n: (n.op == "call_method" and n.target in _SHAPE_METHODS) or (
        n.target is getattr and len(n.args) == 2 and n.args[1] in _SHAPE_ATTRIBUTES))


def _reads_input_shape(node: torch.fx.Node) -> bool:
    """Whether a node's value can depend on the shape of a value that depends on the input (its
    batch size, for one: ``x.shape[0]``, ``x.size(0)``, ``x.numel()``, ``len(x)``)."""
    return _reaches_input(node, lambda n: False)


def _reaches_input(node: torch.fx.Node, cut) -> bool:
    """Whether the graph's input is among the arguments of ``node``, followed back through
    every node except those for which ``cut(node)`` holds."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or cut(n):
            continue
        seen.add(n)
        if _is_input(n):
            return True
        stack.extend(_tensor_args(n))
    return False


def _is_input(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the input of its graph: its first placeholder (the others are the extra
    arguments of ``forward``, at their defaults)."""
    return node.op == "placeholder" and node is next(iter(node.graph.nodes))


_IN_PLACE_OPERATIONS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
                        "lshift", "rshift")
#: ``a += b`` and friends, ``a[i] = b``: they write into their first argument.
_IN_PLACE_OPERATORS = {getattr(operator, f"i{name}") for name in _IN_PLACE_OPERATIONS} | {operator.setitem}
_IN_PLACE_DUNDERS = {f"__i{name}__" for name in _IN_PLACE_OPERATIONS} | {"__setitem__"}
#: In-place methods that change the size or memory of a tensor, not only its values.
_MEMORY_CHANGES = {"resize_", "resize_as_", "set_", "as_strided_", torch.Tensor.resize_, torch.Tensor.resize_as_,
                   torch.Tensor.set_, torch.Tensor.as_strided_}
#: Methods that give another handle on a tensor's memory (a numpy array, a storage, an address),
#: through which writes move no version counter and escape every check of the graph.
_UNTRACKED_ALIASES = {"numpy", "untyped_storage", "storage", "_typed_storage", "data_ptr", "__dlpack__", "__array__"}


def _writes_into_first_argument(node: torch.fx.Node, module: nn.Module) -> bool:
    """Whether a node writes into the tensor of its first argument: a method or function whose
    name ends in ``_`` (``mul_``, ``torch.relu_``), ``a += b``, ``a[i] = b``, ``inplace=True``
    given by keyword or position, or a child with an in-place module anywhere inside it (an
    ``nn.Sequential`` ending in ``ReLU(inplace=True)`` writes into its input as well)."""
    if node.op == "call_module":
        return any(getattr(m, "inplace", False) is True for m in module.get_submodule(node.target).modules())
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):  # torch.ops.aten.mul_.Scalar: named "mul_.Scalar"
        return target._schema.is_mutable
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in _IN_PLACE_OPERATORS or name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
        return True
    inplace = node.kwargs.get("inplace", False)
    if "inplace" not in node.kwargs and node.op == "call_function":
        try:
            inplace = inspect.signature(target).bind(*node.args, **node.kwargs).arguments.get("inplace", False)
        except (TypeError, ValueError):  # no signature (a builtin) or other arguments: no inplace argument
            inplace = False
    return isinstance(inplace, torch.fx.Node) or bool(inplace)


def _leaves(value) -> list:
    """The values in nested lists, tuples (``torch.Size``) and dicts."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def _tensors(value) -> list[torch.Tensor]:
    return [v for v in _leaves(value) if torch.is_tensor(v)]


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter of a tensor (bumped by every in-place write into its memory); None for
    an inference tensor, which has none (and cannot be written into outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing into ``a`` may change ``b``: the same tensor, or the same memory block
    (a view, or a tensor whose memory cannot be read, counts as shared)."""
    if a is b:
        return True
    try:
        if a.layout != torch.strided or b.layout != torch.strided:
            return True
        first, second = a.untyped_storage(), b.untyped_storage()
        return first.nbytes() > 0 and a.device == b.device and first.data_ptr() == second.data_ptr()
    except (RuntimeError, NotImplementedError):
        return True
