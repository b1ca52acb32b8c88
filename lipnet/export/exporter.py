"""Export a lipnet model to plain PyTorch with its certified Lipschitz bound.

The export is a snapshot of the function the model computes *now*, in eval mode, on
inputs of one shape:

1. The model is deep-copied and put in eval mode; the input's spatial size at each
   :class:`~lipnet.nn.GramConv2d` (or :class:`~lipnet.nn.GramConv1d`), and the output size of each
   :class:`~lipnet.nn.GramConvTranspose2d`, is recorded on a probe batch.
2. Every Gram layer is replaced by a plain ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` /
   ``nn.Linear`` holding a copy of
   ``layer.normalized_weight(input_size)``: the exact tensor its forward pass applies,
   computed from the current weight (no state but the weight is involved, so exporting
   before or after loading a checkpoint, in train or eval mode, can only give the function
   of the weights the model holds at that moment).
3. The certified bound is computed by :func:`lipnet.certify.lipschitz_bound`, whose Gram
   layers bound, in float64, exactly the tensors that were baked.
4. The plain copy is traced with ``torch.export`` (batch dimension dynamic) and written as
   an archive of plain data and tensors (:mod:`lipnet.export.runtime`); convolutions and
   dense layers become ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` modules
   again.
5. The archive is rebuilt by the runtime exactly as a deployment would, and its outputs
   are compared with the original model's at batch sizes 1, 2 and 3; any difference raises.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import lipnet
from lipnet.bounds.rounding import cpu_default_device
from lipnet.certify import LipschitzBoundError, lipschitz_bound
from lipnet.certify.lipschitz import as_compiled, check_input_shape, unwrap_checked
from lipnet.export import runtime
from lipnet.nn.gram_conv import GramConv2d
from lipnet.nn.gram_conv1d import GramConv1d
from lipnet.nn.gram_conv_transpose import GramConvTranspose2d
from lipnet.nn.gram_linear import GramLinear

#: Tolerance of the self-check, in units of the dtype's epsilon times the output scale.
#: The exported graph runs the same kernels as the model, so it is exact on CPU; the
#: slack covers kernels that are not bitwise reproducible on accelerators.
_CHECK_ULPS = 8

# Graph-signature kinds of lifted tensors.
_TENSOR_INPUTS = ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")
# Operators dropped from the graph: metadata assertions that pin the export device.
_DROPPED_OPS = ("_assert_tensor_metadata",)
#: The Gram convolutions, whose normalized weight depends on the size they are applied to.
_GRAM_CONVS = (GramConv1d, GramConv2d, GramConvTranspose2d)


def export(model: nn.Module, input_shape: Sequence[int], *, certify: bool = True) -> runtime.ExportedModel:
    """Plain-PyTorch copy of ``model`` with the normalized weights baked in.

    Args:
        model: a network of lipnet and ``torch.nn`` layers taking one tensor. It is not
            modified (its train/eval mode included); the eval-mode function is exported. torch's
            wrappers (``torch.compile``, ``DataParallel``, DDP, ``AveragedModel``) export the
            module inside, a compiled one with the weights its compiled forward applies.
        input_shape: shape of one input without the batch dimension, e.g. ``(3, 32, 32)``.
            A Gram convolution's normalized weight depends on its input's spatial size
            (zero padding), so the export is valid, and only accepts inputs, of this shape.
        certify: compute the certified Lipschitz bound of the exported weights with
            :func:`lipnet.certify.lipschitz_bound` (which raises on layers it cannot bound).
            ``False`` exports for inference only: ``lipschitz_bound`` is ``None``.

    Returns:
        A :class:`~lipnet.export.runtime.ExportedModel` (a plain ``nn.Module``): call it,
        read ``lipschitz_bound``, ``save(path)`` it. The saved file loads with
        ``torch.load(path, weights_only=True)`` and runs without lipnet through the
        single-file runtime :mod:`lipnet.export.runtime`.

    Raises:
        ValueError: bad ``input_shape``, a model that does not accept it, a parameter or
            buffer on the meta device or with NaN or inf, a layer applied to two spatial sizes,
            a Gram layer whose ``forward`` is overridden, a forward that depends on the batch
            size, or an operator outside the runtime's allowlist.
        RuntimeError: the rebuilt model does not reproduce the original (a bug: report it).

    Example:
        >>> from lipnet.nn import GramConv2d, GramLinear, MaxMin
        >>> net = nn.Sequential(GramConv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), GramLinear(4 * 8 * 8, 10))
        >>> exported = export(net, input_shape=(1, 8, 8))
        >>> exported.lipschitz_bound <= 1 + 1e-5
        True
        >>> x = torch.randn(5, 1, 8, 8)
        >>> float((exported(x) - net(x)).abs().max())
        0.0
    """
    # Outside inference mode: under a caller's torch.inference_mode() the copy's parameters would be
    # inference tensors, which keep no version counter for the Gram layers' weight cache.
    # And tensors created without a device on the CPU, whatever torch.set_default_device says.
    # The module inside torch's wrappers (compile, DataParallel, AveragedModel), after their hooks are
    # checked; a compiled model's Gram layers bake the weights its compiled forward applies.
    with torch.inference_mode(False), cpu_default_device(), as_compiled(model):
        return _export(unwrap_checked(model), input_shape, certify)


def _export(model: nn.Module, input_shape: Sequence[int], certify: bool) -> runtime.ExportedModel:
    input_shape = check_input_shape(input_shape)
    _check_finite_tensors(model)
    reference = copy.deepcopy(model).eval()
    probe = example_input(reference, input_shape, batch=2, seed=0)
    plain = _bake(reference, probe)
    bound = _certified_bound(reference, input_shape) if certify else None
    archive = _archive(plain, probe, input_shape, bound, type(model).__qualname__)
    exported = runtime.build(archive)
    with torch.no_grad():
        for batch, seed in ((2, 1), (3, 2), (1, 3)):
            x = example_input(reference, input_shape, batch=batch, seed=seed)
            # Copies: a model whose first module is in place (ReLU(inplace=True)) overwrites its input.
            try:
                expected = reference(x.clone())
            except ValueError:
                if batch != 1:
                    raise
                # The model itself refuses one example (BatchNorm with batch statistics over flat features:
                # "Expected more than 1 value per channel"): there is no output at batch size 1 to compare.
                continue
            _check_same(plain(x.clone()), expected, "the baked copy")
            try:
                _check_same(exported(x.clone()), expected, "the exported model")
            except RuntimeError as error:
                if batch != 1:
                    raise
                # torch.export assumes a dynamic size is at least 2 and drops the branches for 1.
                raise ValueError("the model computes something else at batch size 1 than the graph torch.export "
                                 "traced at batch size 2 (its forward depends on the batch size, e.g. "
                                 "`if x.shape[0] == 1`), so the export would differ from it at batch size 1; make "
                                 "the forward independent of the batch size") from error
    return exported


def example_input(model: nn.Module, input_shape, *, batch: int, seed: int) -> torch.Tensor:
    """A seeded standard normal batch on the device and in the dtype of ``model``'s tensors."""
    tensor = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype = torch.get_default_dtype() if tensor is None else tensor.dtype
    device = torch.device("cpu") if tensor is None else tensor.device
    generator = torch.Generator().manual_seed(seed)
    # On the CPU explicitly (the generator's device), whatever torch.set_default_device says.
    return torch.randn(batch, *input_shape, generator=generator, dtype=dtype, device="cpu").to(device)


def _check_finite_tensors(model: nn.Module) -> None:
    """A ``ValueError`` naming the first parameter or buffer on the meta device (no values to
    bake) or with NaN or inf (a Gram layer's bound, and so every weight it would bake, is then
    NaN; any other tensor makes the outputs NaN), instead of the forward's error blamed on the
    input or the runtime's on the archive."""
    for path, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"cannot export: {path!r} is on the meta device, where tensors hold no values; "
                             "materialize the model (model.to_empty(device='cpu')) and load its weights first")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor.detach()).all()):
            what = "NaN" if bool(torch.isnan(tensor.detach()).any()) else "inf"
            owner = model.get_submodule(path.rpartition(".")[0])
            raise ValueError(f"cannot export: {path!r} ({type(owner).__name__}) contains {what}, so the exported "
                             "network would compute NaN or inf. Training has probably diverged: export the last "
                             "checkpoint with finite weights")


def _input_sizes(model: nn.Module, probe: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """The size each Gram convolution's bound is for (by ``id``) on ``probe``: the spatial size of
    its input, ``(h, w)`` or ``(n,)`` for a 1-D one; the spatial size of its output for a
    transposed one (an :class:`~lipnet.nn.gram_conv_transpose.OutputSize`)."""
    sizes: dict[int, tuple[int, ...]] = {}
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}

    def record(module, args, kwargs):
        if isinstance(module, GramConvTranspose2d):
            output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            size, _ = module._output_size(args[0], output_size)
            what = "outputs"
        else:
            size, what = tuple(int(s) for s in args[0].shape[-len(module.kernel_size):]), "inputs"
        if sizes.setdefault(id(module), size) != size:
            raise ValueError(f"layer {names[id(module)]!r} is applied with {what} of spatial sizes "
                             f"{tuple(sizes[id(module)])} and {tuple(size)}: its normalized weight differs between "
                             f"them, so it cannot be baked into one nn.{_plain_type(module).__name__}")

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
               if isinstance(m, _GRAM_CONVS)]
    try:
        with torch.no_grad():
            model(probe.clone())
    except Exception as error:
        if isinstance(error, ValueError) and "cannot be baked" in str(error):
            raise
        raise ValueError(f"the model does not accept inputs of shape (batch, {', '.join(map(str, probe.shape[1:]))}): "
                         f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _bake(reference: nn.Module, probe: torch.Tensor) -> nn.Module:
    """Copy of ``reference`` with every Gram layer replaced by a plain layer of its normalized weight."""
    sizes = _input_sizes(reference, probe)
    replacements = {}
    with torch.no_grad():
        for path, layer in reference.named_modules():
            if isinstance(layer, GramLinear) or (isinstance(layer, _GRAM_CONVS) and id(layer) in sizes):
                _check_forward_as_written(layer, path)
                replacements[id(layer)] = _plain_layer(layer, sizes.get(id(layer)))
    # deepcopy substitutes the objects its memo already maps, wherever (and however often) they occur.
    return copy.deepcopy(reference, memo=replacements)


def _check_forward_as_written(layer: nn.Module, path: str) -> None:
    """Refuse a Gram layer whose ``forward`` is not its Gram class's: the plain layer that replaces
    it computes that class's ``forward`` as written, with the normalized weight."""
    gram = next(cls for cls in (GramConvTranspose2d, GramConv1d, GramConv2d, GramLinear) if isinstance(layer, cls))
    if type(layer).forward is not gram.forward or "forward" in vars(layer):
        raise ValueError(f"cannot export layer {path or 'the model'!r} ({type(layer).__name__}): it overrides "
                         f"{gram.__name__}.forward, and export replaces a {gram.__name__} by a plain "
                         f"nn.{_plain_type(layer).__name__} of its normalized weight, which computes "
                         f"{gram.__name__}.forward only; put the extra computation in a module around the layer")


def _plain_layer(layer: nn.Module, input_size) -> nn.Module:
    weight = layer.normalized_weight(input_size).detach().clone()
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, GramConvTranspose2d):
        plain = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                   layer.output_padding, layer.groups, layer.bias is not None, layer.dilation,
                                   layer.padding_mode, **factory)
    elif isinstance(layer, (GramConv1d, GramConv2d)):
        plain = _plain_type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                   layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                   layer.padding_mode, **factory)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return plain


def _plain_type(layer: nn.Module) -> type[nn.Module]:
    """The ``torch.nn`` class a Gram layer is exported as."""
    for gram, plain in ((GramConvTranspose2d, nn.ConvTranspose2d), (GramConv1d, nn.Conv1d), (GramConv2d, nn.Conv2d),
                        (GramLinear, nn.Linear)):
        if isinstance(layer, gram):
            return plain
    raise TypeError(f"{type(layer).__name__} is not a Gram layer")


def _certified_bound(reference: nn.Module, input_shape) -> float:
    """:func:`lipnet.certify.lipschitz_bound` of the model, whose Gram layers bound exactly the
    tensors that were baked: ``layer.lipschitz_bound(size)`` certifies ``normalized_weight(size)``."""
    try:
        return float(lipschitz_bound(reference, input_shape))
    except LipschitzBoundError as error:
        raise ValueError(f"cannot certify the exported model: {error}. export(..., certify=False) exports it "
                         "without a Lipschitz bound, for inference only") from error


def _archive(plain: nn.Module, probe: torch.Tensor, input_shape, bound, model_name: str) -> dict:
    """Trace ``plain`` with ``torch.export`` and describe it as plain data (see :mod:`lipnet.export.runtime`)."""
    try:
        program = torch.export.export(plain, (probe,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    except Exception as error:
        raise ValueError(f"torch.export could not trace the model with a dynamic batch dimension: "
                         f"{type(error).__name__}: {error}") from error
    signature = program.graph_signature
    if any(spec.kind.name != "USER_OUTPUT" for spec in signature.output_specs):
        raise ValueError("the model mutates its buffers in eval mode; export needs a pure function")
    tensors = {**program.state_dict, **program.constants}
    lifted = {spec.arg.name: spec.target for spec in signature.input_specs if spec.kind.name in _TENSOR_INPUTS}
    layers = _layers(program.graph, lifted)
    modules, nodes, state_dict = {}, [], {}

    def encode(value):
        """Encode a node argument; a lifted tensor becomes a ``get_attr`` node at its first use."""
        def register(node):
            target = lifted.get(node.name)
            if target is not None and target not in state_dict:
                state_dict[target] = tensors[target].detach().clone()
                nodes.append({"name": node.name, "op": "get_attr", "target": target, "args": [], "kwargs": {}})
            return node

        torch.fx.node.map_arg(value, register)
        return runtime.encode(value)

    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name not in lifted:
                nodes.append({"name": node.name, "op": "placeholder", "target": node.name, "args": [], "kwargs": {}})
        elif node.op == "output":
            outputs = torch.utils._pytree.tree_unflatten(list(node.args[0]), program.call_spec.out_spec)
            nodes.append({"name": node.name, "op": "output", "target": "output", "args": [encode(outputs)],
                          "kwargs": {}})
        elif node.op == "call_function" and node in layers:
            path, spec, operand = layers[node]
            modules[path] = spec
            for key in ("weight", "bias"):
                if f"{path}.{key}" in tensors:
                    state_dict[f"{path}.{key}"] = tensors[f"{path}.{key}"].detach().clone()
            nodes.append({"name": node.name, "op": "call_module", "target": path, "args": [encode(operand)],
                          "kwargs": {}})
        elif node.op == "call_function":
            if isinstance(node.target, torch._ops.OpOverload) and node.target._opname in _DROPPED_OPS:
                continue
            name = runtime.function_name(node.target)
            if name is None:
                raise ValueError(f"operator {node.target} (in {_origin(node)}) is not supported by the export runtime; "
                                 f"its ATen allowlist is: {' '.join(sorted(runtime.ATEN_OPS))}")
            nodes.append({"name": node.name, "op": "call_function", "target": name, "args": encode(list(node.args)),
                          "kwargs": encode(dict(node.kwargs))})
        else:
            raise ValueError(f"unsupported graph node {node.op} {node.target} (in {_origin(node)})")

    metadata = {"lipnet_version": str(lipnet.__version__), "torch_version": str(torch.__version__), "model": model_name,
                "dtype": str(probe.dtype).removeprefix("torch."), "certificate": runtime.CERTIFICATE}
    return {"format": runtime.FORMAT, "format_version": runtime.FORMAT_VERSION, "input_shape": tuple(input_shape),
            "lipschitz_bound": bound, "modules": modules, "nodes": nodes, "state_dict": state_dict,
            "metadata": metadata}


_LAYER_OPS = {
    torch.ops.aten.conv1d.default: "torch.nn.Conv1d",
    torch.ops.aten.conv1d.padding: "torch.nn.Conv1d",
    torch.ops.aten.conv2d.default: "torch.nn.Conv2d",
    torch.ops.aten.conv2d.padding: "torch.nn.Conv2d",
    torch.ops.aten.conv_transpose2d.input: "torch.nn.ConvTranspose2d",
    torch.ops.aten.linear.default: "torch.nn.Linear",
}


def _layers(graph: torch.fx.Graph, lifted: dict[str, str]) -> dict:
    """``{node: (module path, module spec, input node)}`` for the convolution and linear calls
    whose weight and bias are the ``<path>.weight`` / ``<path>.bias`` of one module, used by
    that call only: these become ``nn.Conv2d`` / ``nn.Linear`` modules (any other call stays
    a function of ``get_attr`` tensors)."""
    layers = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        args = _bind(node)
        weight, bias = args["weight"], args["bias"]
        params = [p for p in (weight, bias) if p is not None]
        if not all(isinstance(p, torch.fx.Node) and p.name in lifted and len(p.users) == 1 for p in params):
            continue
        path, _, leaf = lifted[weight.name].rpartition(".")
        if not path or leaf != "weight" or (bias is not None and lifted[bias.name] != f"{path}.bias"):
            continue
        shape = weight.meta["val"].shape
        if _LAYER_OPS[node.target] == "torch.nn.Linear":
            kwargs = {"in_features": shape[1], "out_features": shape[0], "bias": bias is not None}
        elif _LAYER_OPS[node.target] == "torch.nn.ConvTranspose2d":
            kwargs = {"in_channels": shape[0], "out_channels": shape[1] * args["groups"],
                      "kernel_size": tuple(shape[2:]), "stride": tuple(args["stride"]),
                      "padding": tuple(args["padding"]), "output_padding": tuple(args["output_padding"]),
                      "groups": args["groups"], "bias": bias is not None, "dilation": tuple(args["dilation"])}
        else:
            padding = args["padding"] if isinstance(args["padding"], str) else tuple(args["padding"])
            kwargs = {"in_channels": shape[1] * args["groups"], "out_channels": shape[0],
                      "kernel_size": tuple(shape[2:]), "stride": tuple(args["stride"]), "padding": padding,
                      "dilation": tuple(args["dilation"]), "groups": args["groups"], "bias": bias is not None}
        spec = {"type": _LAYER_OPS[node.target], "kwargs": {k: runtime.encode(v) for k, v in kwargs.items()}}
        layers[node] = (path, spec, args["input"])
    return layers


def _bind(node: torch.fx.Node) -> dict:
    """Arguments of an ATen call by name, defaults filled in from its schema."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        else:
            values[arg.name] = node.kwargs.get(arg.name, arg.default_value)
    return values


def _origin(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "the model's forward"
    path, kind = list(stack.values())[-1]
    return f"{path or 'the model'} ({kind})"


def _check_same(actual, expected, what: str) -> None:
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    if len(actual) != len(expected):
        raise RuntimeError(f"{what} returns {len(actual)} outputs instead of {len(expected)}")
    for a, e in zip(actual, expected):
        if not isinstance(e, torch.Tensor):
            continue
        scale = 1 + float(e.detach().abs().max()) if e.numel() else 1.0
        tolerance = _CHECK_ULPS * torch.finfo(e.dtype).eps * scale if e.is_floating_point() else 0.0
        difference = float((a.detach() - e.detach()).abs().max()) if e.numel() else 0.0
        if a.shape != e.shape or a.dtype != e.dtype or not difference <= tolerance:
            raise RuntimeError(f"{what} does not reproduce the lipnet model (max abs difference {difference:.3g}, "
                               f"shapes {tuple(a.shape)} vs {tuple(e.shape)}); please report this as a bug")
