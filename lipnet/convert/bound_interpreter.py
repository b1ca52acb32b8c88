"""Running a traced graph node by node, with a bound on each value's Lipschitz constant."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from lipnet.certify import LipschitzBoundError
from lipnet.certify.lipschitz import add_up, mul_up
from lipnet.convert.graph import (
    _CATS,
    _ELEMENTWISE,
    _FACTORIES,
    _MEMORY_CHANGES,
    _LINEAR_ONE_LIPSCHITZ,
    _ONE_LIPSCHITZ,
    _REARRANGEMENTS,
    _SCALINGS,
    _SHAPE_ATTRIBUTES,
    _SHAPE_METHODS,
    _SORTS,
    _UNTRACKED_ALIASES,
    _SPLITS,
    _SUMS,
    _is_input,
    _key,
    _leaves,
    _reads_input_shape,
    _shares_memory,
    _tensor_args,
    _tensors,
    _version,
    _writes_into_first_argument,
)
from lipnet.nn.pooling import sqrt_up


class _BoundInterpreter(torch.fx.Interpreter):
    """Runs the graph and propagates the bounds of :func:`traced_lipschitz_bound`."""

    def __init__(self, traced: torch.fx.GraphModule, module: nn.Module, batch: int, child_bound, keep_values=False):
        super().__init__(traced, garbage_collect_values=not keep_values)
        self.module = module  # attributes are read from the module itself: a child may replace them
        self.traced = traced
        self.batch = batch
        self.child_bound = child_bound
        self.bound: dict[torch.fx.Node, float] = {}
        # How each node's bound was composed, for the rounding error (_traced_rounding):
        # ("input",), ("constant",), ("child", child, u), ("linear", [(u, factor), ...]), ("exact", u), ("cat", [u, ...])
        self.rule: dict[torch.fx.Node, tuple] = {}
        self.result: float | None = None
        self.position = {node: i for i, node in enumerate(traced.graph.nodes)}
        # Version counters of each node's tensors when it ran (an in-place write anywhere in their
        # memory bumps them), and the tensors no node may write into (set by run).
        self.versions: dict[torch.fx.Node, list[int | None]] = {}
        self.protected: list[tuple[torch.Tensor, int | None, str]] = []
        self.attributes: dict[torch.fx.Node, object] = {}
        # Numbers read from the shape of a value that depends on the input (x.shape[0], x.numel()),
        # and constants whose values may depend on the batch size or on an example's position in
        # the batch (torch.ones(x.shape).cumsum(0)): no factor may be computed from either.
        self.shape_numbers: set[torch.fx.Node] = set()
        # Constants of the input's shape that are the same for every example: a factory given that
        # shape (torch.full(x.shape, 2.0)), then elementwise operations only.
        self.batch_constants: set[torch.fx.Node] = set()
        # Numbers and sizes that depend on the batch size, and those that are the batch size as read
        # from a shape (_note_batch_number): only the latter may give the batch size to a view or reshape.
        self.batch_numbers: set[torch.fx.Node] = set()
        self.batch_sizes: set[torch.fx.Node] = set()
        # The values of constant factors that in-place products overwrite, as they were before (_keep_factor).
        self.overwritten_factors: dict[torch.fx.Node, torch.Tensor] = {}

    def fail(self, node: torch.fx.Node, reason: str):
        raise LipschitzBoundError(self.module, f"node {node.format_node()}: {reason}")

    def fetch_attr(self, target: str):
        """An attribute of the module, or a tensor its forward creates (kept by the GraphModule, see
        :func:`_trace`)."""
        if target in getattr(self.traced, "created_attributes", ()):
            return getattr(self.traced, target)
        return super().fetch_attr(target)

    def run(self, x: torch.Tensor):
        """Run on ``x`` outside inference mode (whose tensors have no version counters and cannot
        be written into), noting the tensors that no node may write into: the input, the module's
        parameters and buffers and the attributes its graph reads."""
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
            self.protected = [(tensor, _version(tensor), f"its parameter or buffer {name!r}") for name, tensor in
                              [*self.module.named_parameters(), *self.module.named_buffers()]]
            self.attributes = {node: self.fetch_attr(node.target) for node in self.graph.nodes if node.op == "get_attr"}
            self.protected += [(value, _version(value), f"its attribute {node.target!r}")
                               for node, value in self.attributes.items() if torch.is_tensor(value)]
            return super().run(x)

    def run_node(self, node: torch.fx.Node):
        if node.op in ("call_function", "call_method", "call_module", "output"):
            self._check_reads(node)
        if node.op in ("call_function", "call_method", "call_module"):
            self._check_writes(node)
            self._keep_factor(node)
        value = super().run_node(node)
        if node.op == "placeholder" and torch.is_tensor(value):
            self.protected.append((value, _version(value), "the input"))
        self._check_state(node, value)
        self.versions[node] = [_version(t) for t in _tensors(value)]
        if isinstance(value, (int, float, torch.SymInt, torch.SymFloat, torch.Size)) and not isinstance(value, bool) and \
                _reads_input_shape(node):
            self.shape_numbers.add(node)
        if node.op == "output":
            (out,) = node.args
            if not isinstance(out, torch.fx.Node) or not torch.is_tensor(self.env[out]):
                self.fail(node, "the forward must return one tensor")
            self.result = self.bound[out]
        else:
            try:
                self._note_batch_number(node, value)
                self.bound[node] = self._node_bound(node, value)
            except LipschitzBoundError:
                raise
            except Exception as error:  # a rule given values of kinds it does not take: refused, not a crash
                self.fail(node, f"its arguments are not of the kinds its Lipschitz rule takes ({type(error).__name__}: "
                                f"{error})")
            if self.bound[node] == 0 and node.op in ("call_function", "call_method", "call_module"):
                self._note_batch_constant(node)
        return value

    def _note_batch_constant(self, node: torch.fx.Node):
        """Track the constants built from a factory of the input's shape: the same for every
        example while only elementwise operations act on them; anything else (``cumsum(0)``,
        ``sum(0)``, indexing, ``torch.empty``'s arbitrary values) may give each position in the
        batch, or each batch size, its own values, so such a constant counts as a shape number."""
        size = (node.args[0] if node.args else node.kwargs.get("size")) if _key(node) in _FACTORIES else None
        sizes: list[torch.fx.Node] = []
        torch.fx.node.map_arg(size, lambda n: sizes.append(n) or n)
        if any(_reads_input_shape(n) for n in sizes):
            (self.batch_constants if node.target is not torch.empty else self.shape_numbers).add(node)
        elif any(a in self.batch_constants for a in _tensor_args(node)):
            (self.batch_constants if _key(node) in _ELEMENTWISE else self.shape_numbers).add(node)
        # A write into a constant (c.mul_(x.shape[0]), c[3:].mul_(100) on c = torch.ones(x.shape))
        # changes every value in the same memory: if it reads a shape number, or writes into a
        # constant of the input's shape otherwise than elementwise on all of it, all of them count
        # as shape numbers.
        operand = node.args[0] if node.args else None
        if not (isinstance(operand, torch.fx.Node) and torch.is_tensor(self.env.get(operand)) and
                _writes_into_first_argument(node, self.module)):
            return
        written = self.env[operand]
        sharing = [other for other, value in self.env.items() if self.bound.get(other, 0.0) == 0 and
                   any(_shares_memory(written, t) for t in _tensors(value))]
        whole = operand in self.batch_constants and _key(node) in _ELEMENTWISE
        if self._reads_shape_number(node) or not whole and any(other in self.batch_constants for other in sharing):
            for other in (*sharing, node):
                self.batch_constants.discard(other)
                self.shape_numbers.add(other)

    def _check_writes(self, node: torch.fx.Node):
        """Refuse, before it runs, a node that writes into a tensor whose values the bounds take as given."""
        if "out" in node.kwargs:
            self.fail(node, "writes its result into an existing tensor (out=...), which other nodes may read as a "
                            "constant; use the returned value")
        if node.op in ("call_function", "call_method") and node.target in _MEMORY_CHANGES:
            self.fail(node, "changes the size or memory of a tensor in place (resize_, set_); build a new tensor")
        if node.op == "call_method" and node.target in _UNTRACKED_ALIASES:
            self.fail(node, f"takes .{node.target}() of a tensor: writes through it change no version counter and "
                            "escape the checks of the graph; use tensor operations")
        if (_writes_into_first_argument(node, self.module) and node.args
                and not isinstance(node.args[0], torch.fx.Node)):
            self.fail(node, "an in-place operation on something else than one value of the graph (a list of tensors, "
                            "as torch._foreach_mul_ takes); use the out-of-place form")
        if not (_writes_into_first_argument(node, self.module) and node.args and
                isinstance(node.args[0], torch.fx.Node) and torch.is_tensor(self.env[node.args[0]])):
            return
        operand = node.args[0]
        written = self.env[operand]
        for tensor, _, what in self.protected:
            if _shares_memory(written, tensor):
                self.fail(node, f"an in-place operation that writes into {what} (through the same tensor or its "
                                "memory: contiguous(), nn.Identity and no-op reshapes return their input); use the "
                                "out-of-place form")
        dependent = any(self.bound.get(a, 0.0) > 0 for a in _tensor_args(node))
        if dependent and len(operand.users) > 1:
            self.fail(node, "an in-place operation on a value that is also used elsewhere")
        if dependent and written._base is not None:
            self.fail(node, "an in-place operation on a view of another value (it also changes that value); use "
                            "the out-of-place form")
        # Any other value in the same memory that is read later would change under its bound: the
        # same tensor object (contiguous(), nn.Identity, a no-op flatten return their input) or a view.
        # A write of constants only matters to values that depend on the input.
        position = self.position[node]
        for other, value in self.env.items():
            if other is operand or not any(self.position[user] > position for user in other.users) or \
                    not (dependent or self.bound.get(other, 0.0) > 0):
                continue
            if any(_shares_memory(written, tensor) for tensor in _tensors(value)):
                self.fail(node, f"an in-place operation on a tensor that is also the value of %{other.name} (the "
                                "same tensor or its memory: contiguous(), nn.Identity and no-op reshapes return "
                                "their input), which is used later; use the out-of-place form")

    def _keep_factor(self, node: torch.fx.Node):
        """Copy a constant factor that an in-place product overwrites (``c.mul_(y)`` leaves ``c * y``
        in ``c``) before it runs: the bound takes the factor's values, not the product's."""
        first = node.args[0] if node.args else None
        if _key(node) in _SCALINGS and isinstance(first, torch.fx.Node) and self.bound.get(first, 0.0) == 0 and \
                torch.is_tensor(self.env[first]) and _writes_into_first_argument(node, self.module):
            self.overwritten_factors[node] = self.env[first].clone()

    def _check_reads(self, node: torch.fx.Node):
        """Refuse a node that reads an input-dependent value changed in place since it was bounded."""
        for a in _tensor_args(node):
            if self.bound.get(a, 0.0) > 0 and [_version(t) for t in _tensors(self.env[a])] != self.versions[a]:
                self.fail(node, f"reads %{a.name} after an in-place operation changed it through another name for "
                                "the same memory (its bound no longer holds); use out-of-place operations")

    def _check_state(self, node: torch.fx.Node, value):
        """Refuse a node that wrote into the input, a parameter, a buffer or an attribute, or that
        read an attribute replaced since the run began."""
        if node.op == "get_attr" and value is not self.attributes[node]:
            self.fail(node, f"reads attribute {node.target!r}, which the forward replaces while it runs; its value "
                            "cannot be taken as a constant")
        for tensor, version, what in self.protected:
            if _version(tensor) != version:
                self.fail(node, f"writes into {what}, whose values this bound takes as given; use out-of-place "
                                "operations")

    def _check_rearrangement(self, node: torch.fx.Node, source: torch.Tensor, *parts: torch.Tensor):
        """Refuse a rearrangement or split given more than sizes and dimensions, or changing the dtype."""
        given = _leaves(torch.fx.node.map_arg((node.args[1:], node.kwargs), lambda n: self.env[n]))
        for v in given:
            if not (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, torch.memory_format)):
                self.fail(node, f"a rearrangement given a {type(v).__name__} ({v!r}): only sizes and dimensions "
                                "are allowed (view(dtype) reinterprets the bits, which is not Lipschitz)")
        for p in parts:
            if p.dtype != source.dtype:
                self.fail(node, f"changes the dtype from {source.dtype} to {p.dtype} (view(dtype) reinterprets "
                                "the bits, which is not Lipschitz)")
        # The batch size may be given as it is, as the first size of a view or reshape; a number
        # computed from it (``(x.shape[0] - 1) % 3 + 1`` is the batch size at 2 and 3, the batches
        # traced, and 1 at 4, where the reshape puts four examples in one row) is refused.
        first = None
        if _key(node) in ("view", "reshape", torch.reshape):
            first = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
            if isinstance(first, (tuple, list)) and first:
                first = first[0]
        sizes: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args[1:], node.kwargs), lambda n: sizes.append(n) or n)
        for n in sizes:
            if n in self.batch_numbers and not (n is first and n in self.batch_sizes):
                self.fail(node, f"a size or dimension computed from the batch size (%{n.name}): the graph is checked "
                                "at batch sizes 1 to 3, and such a number may put several examples in one row at "
                                "others; give the batch size as x.shape[0], x.size(0) or -1, first, and other "
                                "sizes from the other dimensions")

    def _note_batch_number(self, node: torch.fx.Node, value):
        """Note a number or size that depends on the batch size (``batch_numbers``): the first
        dimension or the number of elements of a value whose shape depends on the input's, and what is
        computed from them; and among them the batch size read as it is (``batch_sizes``: ``x.shape``,
        ``x.shape[0]``, ``x.size(0)`` of a batched value)."""
        if torch.is_tensor(value):
            return
        dims, first = None, None
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape" or (
                node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs):
            dims, owner, first = range(len(value)), node.args[0], value[0] if len(value) else None
        elif node.op == "call_method" and node.target == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dim, int) and torch.is_tensor(self.env.get(node.args[0])):
                dims, owner, first = [dim % max(1, self.env[node.args[0]].dim())], node.args[0], value
        elif node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and isinstance(
                self.env.get(node.args[0]), torch.Size) and isinstance(node.args[1], (int, slice)):
            size = self.env[node.args[0]]
            dims = range(len(size))[node.args[1]]
            dims, owner = (dims if isinstance(dims, range) else [dims]), node.args[0]
            first = value if isinstance(value, int) else (value[0] if len(value) else None)
        if dims is not None:
            if 0 in dims and _reads_input_shape(owner):
                self.batch_numbers.add(node)
                # (a constant's first dimension may be any number computed from the batch size)
                if list(dims)[:1] == [0] and first == self.batch and (
                        owner in self.batch_sizes or self.bound.get(owner, 0.0) > 0):
                    self.batch_sizes.add(node)
            return
        if node.op == "call_method" and node.target == "numel" and _reads_input_shape(node) or \
                any(a in self.batch_numbers for a in _tensor_args(node)):
            self.batch_numbers.add(node)

    def _reads_shape_number(self, node: torch.fx.Node) -> bool:
        """Whether a constant (bound 0) is computed from a number read from the shape of a value
        that depends on the input: its batch size, say, which changes from batch to batch. Sizes
        passed whole as the size of a factory (``torch.full(x.shape, 2.0)``) give constants that do
        not change with it; ``torch.tensor(x.shape)`` does."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or self.bound.get(n, 0.0) > 0:
                continue
            seen.add(n)
            if n in self.shape_numbers:
                return True
            if n.op == "call_function" and n.target in _FACTORIES:
                stack.extend(_tensor_args(n)[1:] if n.args and isinstance(n.args[0], torch.fx.Node) else
                             [a for a in _tensor_args(n) if a is not n.kwargs.get("size")])
            else:
                stack.extend(_tensor_args(n))
        return False

    def _batched(self, node, *values):
        for v in values:
            if torch.is_tensor(v) and (v.dim() == 0 or v.shape[0] != self.batch):
                self.fail(node, f"a tensor of shape {tuple(v.shape)} does not keep the batch (of {self.batch}) as its "
                                "first dimension, so this operation may mix examples")

    def _node_bound(self, node: torch.fx.Node, value) -> float:
        args = _tensor_args(node)
        dependent = [a for a in args if self.bound.get(a, 0.0) > 0]
        if node.op == "placeholder":  # the input, or an extra argument of forward at its default (a constant)
            self.rule[node] = ("input",) if _is_input(node) else ("constant",)
            return 1.0 if _is_input(node) else 0.0
        target = node.target
        if node.op == "get_attr" or not dependent or (node.op == "call_method" and target in _SHAPE_METHODS) or (
                target is getattr and len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES):
            self.rule[node] = ("constant",)
            return 0.0  # constant, or a property of the input's shape (not of its values)
        for v in (value if isinstance(value, (tuple, list)) and node.op != "call_module" else (value,)):
            if torch.is_tensor(v) and not (v.is_floating_point() or v.is_complex()):
                self.fail(node, f"a {v.dtype} result that depends on the input (e.g. argmax indices): not a Lipschitz "
                                "function of it")
        if node.op == "call_module":
            child = self.module.get_submodule(target)
            first = node.args[0] if node.args else None
            if dependent != [first] or len(node.args) != 1 or node.kwargs:
                self.fail(node, "a child called with more than its input tensor")
            x = self.env[first]
            if not torch.is_tensor(x):
                self.fail(node, f"a child called with a {type(x).__name__}, not a tensor")
            if x.is_complex():
                self.fail(node, "a child module applied to a complex value: the bounds of modules hold for real inputs "
                                "(complex tanh, for one, has poles on the imaginary axis)")
            self._batched(node, x, value)
            self.rule[node] = ("child", child, first)
            return mul_up(self.child_bound(child, tuple(x.shape[1:])), self.bound[first])
        if target in _SUMS | _SCALINGS and not torch.is_tensor(value):
            self.fail(node, f"a sum or product giving a {type(value).__name__} (tuple concatenation or repetition "
                            "copies its parts): no Lipschitz rule for it")
        if target in _SUMS:
            alpha = node.kwargs.get("alpha", 1)
            operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(node.args) != 2 or set(dependent) - set(operands) or set(node.kwargs) - {"alpha"} or \
                    isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                self.fail(node, "a sum with unsupported arguments")
            total, terms = 0.0, []
            for position, a in enumerate(node.args):
                if isinstance(a, torch.fx.Node) and self.bound[a] > 0:
                    if self.env[a].shape != value.shape:
                        self.fail(node, "a non-constant operand is broadcast (its entries are copied)")
                    scale = max([abs(float(alpha)), *(_magnitudes(applied)[0] for applied in _applied_factors(
                        alpha, value.dtype))]) if position == 1 else 1.0
                    total = add_up(total, mul_up(scale, self.bound[a]))
                    terms.append((a, scale))
            self.rule[node] = ("linear", terms)
            return total
        if target in _SCALINGS:
            if len(dependent) != 1:
                self.fail(node, "a product or quotient of two values that depend on the input")
            if len(node.args) != 2 or set(node.kwargs) - {"rounding_mode"}:
                self.fail(node, "a product or quotient with arguments other than its two operands")
            u = dependent[0]
            other = node.args[1] if node.args[0] is u else node.args[0]
            if isinstance(other, torch.fx.Node) and self._reads_shape_number(other):
                self.fail(node, "a factor computed from the shape of a value that depends on the input (the batch "
                                "size, read by x.shape[0], x.size(0) or x.numel(), changes it from batch to batch, and "
                                "a constant of the input's shape acted on by more than elementwise operations, e.g. "
                                "torch.ones(x.shape).cumsum(0), may differ from example to example); use a constant")
            if isinstance(other, torch.fx.Node):
                constant = self.overwritten_factors.get(node, self.env[other])
            else:
                constant = other
            if torch.is_tensor(constant):
                if constant.numel() == 0:
                    self.fail(node, "an empty factor")
                big, small = _magnitudes(constant)
            elif isinstance(constant, (int, float)) and not isinstance(constant, bool):
                big = small = abs(float(constant))
            else:
                self.fail(node, f"a factor of type {type(constant).__name__}")
            for applied in _applied_factors(constant, value.dtype):
                b, s = _magnitudes(applied)
                big, small = max(big, b), min(small, s)
            if self.env[u].shape != value.shape:
                self.fail(node, "a non-constant operand is broadcast (its entries are copied)")
            if target in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
                if node.args[0] is not u:
                    self.fail(node, "division by a value that depends on the input")
                if node.kwargs.get("rounding_mode") is not None:
                    self.fail(node, f"a division that rounds (rounding_mode={node.kwargs['rounding_mode']!r}): a step "
                                    "function, not Lipschitz")
                factor = math.inf if small == 0 else math.nextafter(1 / small, math.inf)
            else:
                factor = big
            if math.isinf(factor) or math.isnan(factor):
                self.fail(node, "an unbounded factor")
            self.rule[node] = ("linear", [(u, factor)])
            return mul_up(factor, self.bound[u])
        single = len(dependent) == 1 and node.args and node.args[0] is dependent[0]
        if target in _ONE_LIPSCHITZ and single:
            if target not in _LINEAR_ONE_LIPSCHITZ and self.env[dependent[0]].is_complex():
                self.fail(node, "an activation of a complex value (complex tanh has poles on the imaginary axis: it "
                                "is not Lipschitz); only real activations have a rule")
            if target is F.dropout and not (node.kwargs.get("training") is False or
                                            (len(node.args) > 2 and node.args[2] is False)):
                self.fail(node, "dropout that may be active (training not False)")
            self.rule[node] = ("linear", [(dependent[0], 1.0)])
            return self.bound[dependent[0]]
        if target in _REARRANGEMENTS and single:
            self._check_rearrangement(node, self.env[dependent[0]], value)
            self._batched(node, self.env[dependent[0]], value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target in _SPLITS and single:
            position = 1 if target in (torch.unbind, "unbind") else 2  # of dim: unbind(x, dim), split(x, size, dim)
            dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
            if not isinstance(dim, int) or dim % self.env[dependent[0]].dim() == 0:
                self.fail(node, "a split along the batch dimension (at other batch sizes its parts hold other "
                                "examples, or some of them)")
            self._check_rearrangement(node, self.env[dependent[0]], *value)
            self._batched(node, self.env[dependent[0]], *value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target in _SORTS and single:
            position = _SORTS[target]
            dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 1)
            if not isinstance(dim, int) or dim % self.env[dependent[0]].dim() == 0:
                self.fail(node, "a sort along the batch dimension (it would exchange entries between examples)")
            self._batched(node, self.env[dependent[0]], value)
            self.rule[node] = ("exact", dependent[0])  # a permutation of the entries: no rounding
            return self.bound[dependent[0]]
        if target is operator.getitem and single:
            source = self.env[dependent[0]]
            index = node.args[1]
            if isinstance(source, (tuple, list)):
                if not isinstance(index, int):
                    self.fail(node, "an index into a sequence that is not an int")
                self.rule[node] = ("exact", dependent[0])
                return self.bound[dependent[0]]
            indices = index if isinstance(index, tuple) else (index,)
            if not indices or not all(i is Ellipsis or i is None or isinstance(i, slice) and all(
                    not isinstance(b, torch.fx.Node) for b in (i.start, i.stop, i.step)) or
                    isinstance(i, int) for i in indices) or indices[0] != slice(None):
                self.fail(node, "an index other than basic slicing that keeps the whole batch")
            self._batched(node, source, value)
            self.rule[node] = ("exact", dependent[0])
            return self.bound[dependent[0]]
        if target in _CATS and len(node.args) >= 1 and isinstance(node.args[0], (list, tuple)):
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if set(dependent) - set(parts) or not isinstance(dim, int) or dim % value.dim() == 0:
                self.fail(node, "a concatenation along the batch dimension")
            self._batched(node, value, *(self.env[p] for p in parts if isinstance(p, torch.fx.Node)))
            total = 0.0
            for p in parts:
                if isinstance(p, torch.fx.Node) and self.bound[p] > 0:
                    total = add_up(total, mul_up(self.bound[p], self.bound[p]))
            self.rule[node] = ("cat", [p for p in parts if isinstance(p, torch.fx.Node) and self.bound[p] > 0])
            return sqrt_up(total) if total > 0 else 0.0
        self.fail(node, "no Lipschitz rule for this operation")


def _applied_factors(constant, dtype: torch.dtype) -> list[torch.Tensor]:
    """The factor as a product or quotient of ``dtype`` may apply it: cast to ``dtype`` (a 0-dim
    float32 tensor times a bfloat16 one: 1.005 becomes 1.0078125), and, for half precisions, to
    float32, in which torch computes them (``x * 0.1`` multiplies by float32's 0.1, 1.5e-8 more)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return []
    value = constant.detach() if torch.is_tensor(constant) else torch.tensor(float(constant), dtype=torch.float64)
    dtypes = {dtype} | ({torch.float32} if dtype in (torch.float16, torch.bfloat16) else set())
    return [value.to(d) for d in dtypes if d != value.dtype]


def _magnitudes(constant: torch.Tensor) -> tuple[float, float | int]:
    """``(max |c|, min |c|)`` of a constant factor, the first a float rounded upwards. Integers
    are read exactly (``abs`` of the most negative one overflows to itself: ``abs(-128) == -128``
    in int8, and int64 magnitudes above 2^53 round to floats), complex magnitudes in float64 with
    a margin of one rounding."""
    values = constant.detach()
    if values.is_complex():
        magnitudes = values.to(torch.complex128).abs()
        return math.nextafter(float(magnitudes.max()), math.inf), math.nextafter(float(magnitudes.min()), 0.0)
    if values.is_floating_point() or values.dtype == torch.bool:
        magnitudes = values.double().abs()  # exact for every floating dtype
        return float(magnitudes.max()), float(magnitudes.min())
    big = max(abs(int(values.max())), abs(int(values.min())))
    positive, negative = values[values >= 0], values[values < 0]
    small = min(([int(positive.min())] if positive.numel() else []) +
                ([-int(negative.max())] if negative.numel() else []))
    rounded = float(big)
    return (rounded if rounded >= big else math.nextafter(rounded, math.inf)), small
