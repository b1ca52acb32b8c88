"""Clean and certified accuracy of a model on a data set, in one batched pass."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lipnet.certify.lipschitz import as_compiled, module_lipschitz_bounds, split_last_linear
from lipnet.certify.model_state import ModelState
from lipnet.certify.modes import evaluating
from lipnet.certify.precision import exact_kernels, float64_copy, forward_with_error_bound, rounding_allowance
from lipnet.certify.radius import certified_radius, refuse_functorch_transforms, refuse_inside_functorch_transforms
from lipnet.nn.normalized import GramNormalized

#: The L2 radii (pixels in [0, 1]) most papers report on CIFAR-10.
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)


@dataclass
class CertificationResult:
    """Outcome of :func:`certified_accuracy`.

    Attributes:
        eps: the radii asked for.
        clean_accuracy: fraction of correct predictions.
        certified: fraction certified at each ``eps`` (radius ``> eps``), in order.
        radii: ``(N,)`` float64 certified radius of every example (0 if misclassified), CPU.
        correct: ``(N,)`` bool, whether each prediction is right, CPU.
        lipschitz: certified bound of the whole model.
        body_lipschitz: bound of the model without its last linear layer when the tighter
            last-layer radius was used, else ``None``.
        input_shape: the shape of one input the bounds hold for.
        module_bounds: the certified bound of every module bounded as a unit, in the order
            the network applies them: dicts with its path in the model (``""`` for the model
            itself), type, input shape, ``lipschitz`` and ``normalized`` (a layer divided by
            its Gram bound, 1-Lipschitz by construction: the distance of its bound below 1 is
            the Lipschitz budget its training-time bound left unused).
    """

    eps: tuple[float, ...]
    clean_accuracy: float
    certified: tuple[float, ...]
    radii: torch.Tensor = field(repr=False)
    correct: torch.Tensor = field(repr=False)
    lipschitz: float
    body_lipschitz: float | None
    input_shape: tuple[int, ...]
    module_bounds: tuple[dict, ...] = ()

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.radii.numel())

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of examples whose certified radius exceeds ``eps`` (any radius ``eps >= 0``)."""
        if not float(eps) >= 0:
            raise ValueError(f"eps must be a radius >= 0, got {eps} (every radius, 0 for a wrong prediction, exceeds a "
                             "negative one)")
        return float((self.radii > eps).double().mean()) if self.n else math.nan

    def to_dict(self) -> dict:
        """Plain-Python summary (JSON-serializable; radii summarized, not listed)."""
        radii = self.radii[self.correct]
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": [{"eps": e, "accuracy": a} for e, a in zip(self.eps, self.certified)],
            "lipschitz": self.lipschitz,
            "body_lipschitz": self.body_lipschitz,
            "radius": "last-layer" if self.body_lipschitz is not None else "generic",
            "median_radius_of_correct": _median(radii),
            "input_shape": list(self.input_shape),
            "module_bounds": [dict(entry, input_shape=list(entry["input_shape"])) for entry in self.module_bounds],
        }


def certified_accuracy(model: nn.Module, data, eps: Sequence[float] | float = DEFAULT_EPS, *,
                       last_layer: str = "auto", device: torch.device | str | None = None, batch_size: int = 500,
                       progress: bool = True) -> CertificationResult:
    """Clean accuracy and certified accuracy at every ``eps`` in one pass over ``data``.

    The Lipschitz bound is computed once, in float64 with rounding margins
    (:func:`lipschitz_bound`), for the input shape of the first batch; every later batch
    must have that shape. The logits come from a float64 copy of the model that applies the
    model's own weights (Gram layers: their normalized weights as the model applies them),
    with TF32 and cuDNN off, and each radius accounts for a proven bound on that pass's
    rounding error (:mod:`lipnet.certify.precision`): the certificates hold for the model in
    exact arithmetic. The model runs in eval mode without gradients (its mode is restored
    afterwards); predictions are those of the exact model, which can differ from a float32
    forward pass only for inputs within rounding of a decision boundary.

    Args:
        model: the network, mapping inputs in the certified space (e.g. pixels in
            ``[0, 1]``) to logits.
        data: ``(x, y)`` tensors (or numpy arrays, ``y`` also a list), an iterable of ``(x, y)``
            batches of tensors (e.g. a ``DataLoader``), a map-style ``Dataset`` of ``(example,
            label)`` pairs (batched in order), or an object with ``images`` and ``labels``
            (``lipnet.data.ImageDataset``); anything else is a ``TypeError`` naming these.
            ``uint8`` images are scaled to ``[0, 1]``; other inputs are used as they are.
        eps: L2 radii at which certified accuracy is reported (or a single radius).
        last_layer: ``"auto"`` uses the tighter last-layer radius when the model is an
            ``nn.Sequential`` ending in an ``nn.Linear`` (e.g. ``GramLinear``); ``"none"``
            always uses the generic radius ``margin / (sqrt(2) L)``.
        device: where the batches are sent; the model must already be there (default: the
            model's device).
        batch_size: batch size when ``data`` is a pair of tensors, a ``Dataset`` or an ``ImageDataset``.
        progress: show a tqdm progress bar.

    Example:
        >>> from lipnet.nn import GramLinear
        >>> net = nn.Sequential(nn.Flatten(), GramLinear(4, 3))
        >>> x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
        >>> result = certified_accuracy(net, (x, y), eps=[0.1], progress=False)
        >>> 0 <= result.certified[0] <= result.clean_accuracy <= 1
        True
    """
    if isinstance(eps, str):
        raise ValueError(f"eps must be numbers (radii), got the string {eps!r}")
    if isinstance(eps, int | float) or (torch.is_tensor(eps) and eps.dim() == 0):
        eps = (eps,)
    eps = tuple(float(e) for e in eps)
    if any(not e >= 0 or math.isinf(e) for e in eps):
        raise ValueError(f"eps must be finite radii >= 0, got {eps}")
    if last_layer not in ("auto", "none"):
        raise ValueError(f"last_layer must be 'auto' or 'none', got {last_layer!r}")
    device = resolve_device(model, device)
    radii, correct = [], []
    batches, count = _batches(data, batch_size)
    seen = 0  # examples before this batch, to name the bad ones by their index in data
    with evaluating(model), torch.no_grad(), exact_kernels(), as_compiled(model):
        exact = ExactLogits(model, last_layer)
        for x, y in tqdm(batches, desc="certify", disable=not progress, total=count):
            if len(x) == 0:  # an empty batch (a loader's last one, a filtered one): nothing to certify in it
                continue
            logits, rounding = exact(x.to(device))
            if logits.is_complex():
                raise ValueError(f"the model's logits are complex ({logits.dtype}): a margin compares real scores, so "
                                 "no radius can be certified; end the model with real outputs")
            _refuse_non_finite_logits(logits, x, seen)
            seen += len(x)
            y = y.to(device)
            if exact.split is None:
                r = certified_radius(logits, y, exact.bounds["lipschitz"], rounding=rounding)
            else:
                r = certified_radius(logits, y, last_layer=exact.split[1],
                                     body_lipschitz=exact.bounds["body_lipschitz"], rounding=rounding)
            radii.append(r.cpu())
            correct.append((logits.argmax(dim=1) == y).cpu())
    if not radii:
        raise ValueError("data is empty: nothing to certify")
    bounds = exact.bounds
    radii, correct = torch.cat(radii), torch.cat(correct)
    return CertificationResult(
        eps=eps,
        clean_accuracy=float(correct.double().mean()),
        certified=tuple(float((radii > e).double().mean()) for e in eps),
        radii=radii,
        correct=correct,
        lipschitz=bounds["lipschitz"],
        body_lipschitz=bounds.get("body_lipschitz"),
        input_shape=bounds["input_shape"],
        module_bounds=module_bound_table(exact.model, bounds["modules"]),
    )


def _refuse_non_finite_logits(logits: torch.Tensor, x: torch.Tensor, seen: int) -> None:
    """Raise ``ValueError`` naming the examples (by index in the data, ``seen`` before this batch)
    whose float64 logits hold NaN or inf, and saying whether their inputs do."""
    bad = ~torch.isfinite(logits).all(dim=1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero()[:, 0].cpu()
    inputs = x.flatten(1)[rows]
    bad_inputs = int((~torch.isfinite(inputs).all(dim=1)).sum()) if inputs.is_floating_point() else 0
    listed = ", ".join(str(seen + int(i)) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise ValueError(f"the model's float64 logits contain NaN or inf for {len(rows)} example(s) (index in data: "
                     f"{listed}), of which {bad_inputs} have NaN or inf inputs: no radius can be certified for them; "
                     "check the model and those inputs, or leave them out to certify the others")


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device of ``model``'s parameters (the CPU without any), which ``device`` must name if
    given: ``"cuda"`` for a model on ``cuda:1`` means ``cuda:1``, not the current GPU."""
    model_device = next((p.device for p in model.parameters()), None)
    if model_device is not None and model_device.type == "meta":
        raise ValueError("the model is on the meta device: its parameters hold no values to certify; materialize it "
                         "first (model.to_empty(device=...) and load_state_dict)")
    device = torch.device(device) if device is not None else model_device or torch.device("cpu")
    if model_device is None:
        return device
    if model_device.type != device.type or (device.type != "cpu" and None not in (device.index, model_device.index)
                                            and device.index != model_device.index):
        raise ValueError(f"the model is on {model_device} but device={device}: move it with model.to(device) first")
    return model_device


def module_bound_table(model: nn.Module, modules: dict) -> tuple[dict, ...]:
    """The entries of :attr:`CertificationResult.module_bounds` from the ``bounds`` of
    :func:`~lipnet.certify.lipschitz.module_lipschitz_bounds` on ``model``."""
    named = {id(module): (name, module) for name, module in model.named_modules()}
    table = []
    for (key, shape), value in modules.items():
        name, module = named[key]
        table.append({"module": name, "type": type(module).__name__, "input_shape": tuple(shape), "lipschitz": value,
                      "normalized": isinstance(module, GramNormalized)})
    return tuple(table)


class ExactLogits:
    """The logits of ``model`` in exact arithmetic, up to a proven per-example allowance.

    Holds :func:`~lipnet.certify.precision.float64_copy` of the model and, from the first
    batch on, its Lipschitz bounds for that batch's input shape (``bounds``: ``input_shape``,
    ``lipschitz``, ``modules`` and, when ``split`` is the copy's ``(body, last linear layer)``,
    ``body_lipschitz``). Calling it on a non-empty batch of inputs (cast to the model's dtype
    first: the input the model would see; ``x`` itself is not written to) returns ``(logits, rounding)``, the float64 logits and
    the bound on each logit's error of :func:`~lipnet.certify.precision.rounding_allowance`. Use
    it with the model in eval mode, without gradients, under
    :func:`~lipnet.certify.precision.exact_kernels`.
    """

    def __init__(self, model: nn.Module, last_layer: str = "auto"):
        # A model without floating parameters sees its inputs in their own dtype (uint8 images scaled
        # in float32), not in torch's default dtype: under torch.set_default_dtype(torch.float16) a
        # float32 input cast to it would be certified for another point (0.5003 and 0.5002 both
        # round to a multiple of 2^-11, and the radius, 7e-5, read as 3.5e-4). Its copy is made
        # for the first batch's dtype and device, which its nearest upsampling's index arithmetic follows.
        refuse_inside_functorch_transforms()
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self._original, self._last_layer = model, last_layer
        self.model = self.split = self.bounds = None
        if self.dtype is not None:
            self._copy(None)

    def _copy(self, inputs: torch.Tensor | None) -> None:
        self._state = ModelState(self._original)
        self.model = float64_copy(self._original, inputs=inputs)
        self.split = split_last_linear(self.model) if self._last_layer == "auto" else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        refuse_functorch_transforms(x)
        if self.model is not None and not self._state.unchanged():
            raise ValueError("the model's parameters, buffers or settings changed while it was being certified "
                             "(written between two batches, e.g. by the data iterator or another thread): its copy and "
                             "bounds are those of the model before; certify a model that does not change, or certify "
                             "again")
        seen = model_input(x, self.dtype)
        if self.model is None:
            self._copy(seen)
            self._input_dtype = seen.dtype
        elif self.dtype is None and seen.dtype != self._input_dtype:
            raise ValueError(f"inputs of {seen.dtype} after inputs of {self._input_dtype}: a model without floating "
                             "parameters computes in its inputs' dtype, and its copy was made for the first")
        x = seen.to(torch.float64, copy=True)  # an in-place first module must not write to x
        shape = tuple(x.shape[1:])
        if self.bounds is None:
            self.bounds = {"input_shape": shape, **self._bounds(shape)}
        elif shape != self.bounds["input_shape"]:
            raise ValueError(f"inputs of shape {shape} after inputs of shape {self.bounds['input_shape']}: the "
                             "Lipschitz bound holds for one input shape")
        logits, err = forward_with_error_bound(self.model, x, self.bounds["modules"])
        return logits, rounding_allowance(logits, err)


    def _bounds(self, shape: tuple[int, ...]) -> dict:
        """``lipschitz``, ``modules`` and, with a split, ``body_lipschitz`` for inputs of ``shape``
        (a plain ``nn.Linear`` last layer is bounded as :func:`lipschitz_bound` bounds it: the
        float64 Gram bound of its weight with its rounding margin; the last-layer radii do not use
        it, but the generic constant and the rounding error of the logits do)."""
        lipschitz, modules = module_lipschitz_bounds(self.model, shape)
        if self.split is None:
            return {"lipschitz": lipschitz, "modules": modules}
        body_lipschitz, _ = module_lipschitz_bounds(self.split[0], shape, reuse=modules)  # its units bounded once
        return {"lipschitz": lipschitz, "modules": modules, "body_lipschitz": body_lipschitz}


def model_input(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` as a model of ``dtype`` sees it: ``uint8`` images scaled to ``[0, 1]``, floats cast
    (``dtype=None``, a model without floating parameters: floats as they are, images scaled in float32).

    Complex inputs are refused: casting them to a real dtype drops their imaginary parts, and a
    real model does not take them."""
    if x.is_complex():
        raise TypeError(f"inputs must be real, got {x.dtype}: casting would certify their real parts only")
    if x.dtype == torch.uint8:
        return x.to(dtype or torch.float32) / 255
    return x.to(dtype) if x.is_floating_point() and dtype is not None else x


def _batches(data, batch_size: int) -> tuple[Iterable, int | None]:
    """The ``(x, y)`` batches ``data`` stands for, and their number (``None`` if unknown)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pair = _as_pair(data)
    if pair is not None:
        x, y = pair
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size))
        return batches, -(-x.shape[0] // batch_size)
    if _is_example_dataset(data):  # single (example, label) pairs: batched in order, as a DataLoader would
        data = torch.utils.data.DataLoader(data, batch_size=batch_size)
    elif _is_map_dataset(data):  # whole batches: items 0 to len - 1 (iterating reads on until an IndexError)
        count = len(data)
        return (_checked_batch(data[i]) for i in range(count)), count
    elif torch.is_tensor(data) or isinstance(data, dict | str | bytes):
        raise TypeError(f"data must be {_DATA_FORMS}; got a {type(data).__name__}")
    try:
        count = len(data)
    except TypeError:
        count = None
    return (_checked_batch(batch) for batch in data), count


_DATA_FORMS = ("(x, y) tensors (or numpy arrays), an iterable of (x, y) batches such as a DataLoader, a Dataset of "
               "(example, label) pairs, or an object with images and labels (lipnet.data.ImageDataset)")


def _as_pair(data):
    """``(x, y)`` tensors when ``data`` is one pair (tensors, or numpy arrays and label lists) or
    holds ``images`` and ``labels`` (a torch ``Dataset`` is read through its items: what it holds
    under those names need not be what it yields); ``None`` for an iterable of batches."""
    if hasattr(data, "images") and hasattr(data, "labels") and not isinstance(data, torch.utils.data.Dataset):
        return data.images, data.labels
    if isinstance(data, tuple | list) and len(data) == 2 and _is_array(data[0]):
        x, y = data
        if isinstance(y, list):  # on the CPU, as numpy arrays are, whatever torch.set_default_device says
            y = torch.tensor(y, device="cpu") if y else torch.zeros(0, dtype=torch.long, device="cpu")
        if _is_array(y):
            return _as_tensor(x), _as_tensor(y)
    return None


def _is_array(value) -> bool:
    return torch.is_tensor(value) or isinstance(value, np.ndarray)


def _as_tensor(value) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.as_tensor(value, device="cpu")


def _is_map_dataset(data) -> bool:
    """A map-style ``Dataset`` with a length (items ``data[i]``, ``0 <= i < len(data)``)."""
    if not isinstance(data, torch.utils.data.Dataset) or isinstance(data, torch.utils.data.IterableDataset):
        return False
    try:
        len(data)
    except TypeError:
        return False
    return True


def _is_example_dataset(data) -> bool:
    """A map-style ``Dataset`` whose first item is one example: a pair whose label is a number or a
    0-dim tensor or array (a ``Dataset`` whose items are whole ``(x, y)`` batches is read as they are)."""
    if not _is_map_dataset(data):
        return False
    try:
        if len(data) == 0:
            return False
        first = data[0]
    except (TypeError, IndexError, KeyError, NotImplementedError):
        return False
    if isinstance(first, tuple | list) and len(first) == 2:
        label = first[1]
        return ((torch.is_tensor(label) or isinstance(label, np.ndarray)) and label.ndim == 0) or isinstance(
            label, int | np.integer)
    return True  # another form of example (a dict, a triple): batched, then refused naming the forms


def _checked_batch(batch):
    """A batch of an iterable ``data``: a pair of tensors ``(x, y)``, ``y`` with one label per example."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch):
        if batch[1].dim() == 1:
            return batch
        what = f"labels of shape {tuple(batch[1].shape)}"
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        what = f"a pair of {type(batch[0]).__name__} and {type(batch[1]).__name__}"
    else:
        what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, tuple | list) else "")
    raise TypeError(f"data must be {_DATA_FORMS}; a batch here is {what}, where each batch must be a pair (x, y) "
                    "of tensors, y holding one class index per example")


def _median(values: torch.Tensor) -> float | None:
    """The median of a 1-D tensor (the mean of the two middle values for an even count: ``torch.median``
    takes the lower one); ``None`` for no values."""
    n = values.numel()
    if n == 0:
        return None
    ordered = values.sort().values
    return float(ordered[(n - 1) // 2] / 2 + ordered[n // 2] / 2)  # halves first: no overflow to inf
