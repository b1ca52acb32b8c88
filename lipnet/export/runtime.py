"""Run a network exported by :func:`lipnet.export` with plain PyTorch.

This file imports only ``torch`` and the standard library, so it runs where lipnet is not
installed: copy it next to your code (e.g. as ``lipnet_runtime.py``) and::

    from lipnet_runtime import load
    model = load("model.pt")                  # torch.load(..., weights_only=True) inside
    logits = model(x)                         # x of shape (batch, *model.input_shape)
    radius = model.certified_radius(logits)   # certified L2 radius of each prediction

Archive format (version 1)
--------------------------
An archive is a ``dict`` that ``torch.load(path, weights_only=True)`` reads (strings,
numbers, booleans, ``None``, lists, tuples, dicts and tensors only):

* ``format``, ``format_version``: ``"lipnet-export"`` and ``1``;
* ``input_shape``: the input shape without the batch dimension, e.g. ``(3, 32, 32)``. The
  baked-in weights (and so the certificate) are only valid for this shape;
* ``lipschitz_bound``: certified float64 upper bound on the L2 Lipschitz constant of the
  network on inputs of that shape, computed on the exported weights (``None`` if the model
  was exported without a certificate);
* ``modules``: ``{qualified name: {"type": "torch.nn.Conv2d", "kwargs": {...}}}``, the
  convolutions and dense layers, with their constructor arguments;
* ``nodes``: a ``torch.fx`` graph, one dict per node (``name``, ``op``, ``target``, ``args``,
  ``kwargs``), at the level of ATen operators (as ``torch.export`` records them). Node
  references are written ``{"$node": name}``; tuples, slices, dtypes and devices are
  tagged the same way (see :func:`encode`);
* ``state_dict``: the tensors of the modules and of ``get_attr`` nodes;
* ``metadata``: strings (versions, the certificate formula).

Nothing in an archive is executed when it is loaded: operators are looked up by name in
the allowlist :data:`ATEN_OPS` (and must be real overloads of them), layers are
instantiated from ``torch.nn`` by name with the arguments of their constructors, and the
graph is rebuilt with names of the runtime's own (the archive's node names, module paths
and keyword names are checked as plain identifiers, never pasted into generated code). The
layers are created on the meta device and receive the archive's tensors, which must be finite,
must not overlap, and are never written to by the graph; no operator of a certified archive
runs in training mode, nor mixes the examples of a batch. A file whose bytes changed after it was written (its zip records no
longer match their CRC-32) is refused, and so is a bound below the norm of the network's
Jacobian at a random input (:func:`build`). A file edited on purpose, with matching
checksums, can still claim a bound that is false by less than that catches: the certificate
is as trustworthy as the file's origin.
"""

from __future__ import annotations

import errno
import keyword
import math
import operator
import os
import secrets
import stat
import zipfile

import torch
from torch import nn

__all__ = ["ATEN_OPS", "CERTIFICATE", "FORMAT", "FORMAT_VERSION", "LOGIT_ROUNDING_ULPS", "MAX_CHECK_BYTES", "MODULES",
           "ExportedModel", "atomic_save", "atomic_write", "build", "damaged_record", "decode", "encode",
           "function_name", "load", "resolve_function"]

FORMAT = "lipnet-export"
FORMAT_VERSION = 1

#: How a prediction is certified; stored in each archive's metadata.
CERTIFICATE = ("an input x whose logits z = model(x) have top class c is certified at L2 radius "
               "(z_c - max_{j != c} z_j) / (sqrt(2) * lipschitz_bound)")

#: Units of the logits' machine epsilon by which each logit is assumed uncertain (the
#: value of ``lipnet.certify.radius.LOGIT_ROUNDING_ULPS``).
LOGIT_ROUNDING_ULPS = 1024

#: The default limit of the check at load: the bytes that the results of one example's
#: forward pass may take in all (see :func:`build`).
MAX_CHECK_BYTES = 2 ** 30

# The most rows of the network's Jacobian :func:`build` computes to check the stored bound.
_JACOBIAN_ROWS = 16

# Units of the dtype's epsilon by which that check lets the Jacobian's norm exceed the bound.
_JACOBIAN_SLACK = 1024

#: Layer types the archive's ``modules`` may name.
MODULES = {"torch.nn.Conv1d": nn.Conv1d, "torch.nn.Conv2d": nn.Conv2d, "torch.nn.ConvTranspose2d": nn.ConvTranspose2d,
           "torch.nn.Linear": nn.Linear}

#: ATen operator packets an archive may call (any overload): pure tensor computations.
ATEN_OPS = frozenset("""
    _adaptive_avg_pool2d _assert_scalar _native_batch_norm_legit_no_training _softmax _to_copy _log_softmax
    abs adaptive_avg_pool2d adaptive_max_pool2d add add_ addmm alias amax amin arange avg_pool2d
    batch_norm bmm cat chunk clamp clamp_ clamp_max clamp_max_ clamp_min clamp_min_ clone constant_pad_nd
    contiguous conv1d conv2d conv_transpose2d convolution cumsum detach div div_ dropout elu elu_ eq erf exp expand expm1
    flatten flip full full_like ge gelu gt hardsigmoid hardswish hardtanh hardtanh_ index_select
    layer_norm le leaky_relu leaky_relu_ lift_fresh_copy linalg_vector_norm linear log log1p log_softmax
    logsumexp lt matmul max max_pool2d max_pool2d_with_indices maximum mean min minimum mm mul mul_
    native_batch_norm native_layer_norm ne neg norm ones ones_like pad permute pixel_shuffle pixel_unshuffle
    pow reciprocal reflection_pad2d relu relu_ repeat replication_pad2d reshape roll rsqrt rsub
    scalar_tensor select sigmoid sigmoid_ sign silu silu_ slice softmax softplus sort split split_with_sizes
    sqrt square squeeze stack sub sub_ sum sym_numel sym_size sym_stride t tanh tanh_ to topk transpose
    type_as unbind unflatten unsqueeze upsample_bilinear2d upsample_nearest2d view where zeros zeros_like
    _prelu_kernel _upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d
    adaptive_avg_pool1d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool3d alpha_dropout avg_pool1d
    avg_pool3d celu celu_ channel_shuffle feature_alpha_dropout feature_dropout feature_dropout_ dropout_
    hardshrink hardsigmoid_ hardswish_ leaky_relu log_sigmoid log_sigmoid_forward max_pool1d
    max_pool1d_with_indices max_pool3d max_pool3d_with_indices mish mish_ native_channel_shuffle prelu
    reflection_pad1d reflection_pad3d replication_pad1d replication_pad3d rrelu rrelu_ selu selu_ softshrink
    threshold threshold_ upsample_nearest1d upsample_nearest3d
""".split())

_PYTHON_FUNCTIONS = {f"operator.{name}": getattr(operator, name)
                     for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "getitem", "eq", "ne",
                                  "lt", "le", "gt", "ge")}


def function_name(target) -> str | None:
    """Archive name of a graph function (``"aten.conv2d.default"``), or ``None`` if not allowed."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "aten" and target._opname in ATEN_OPS:
            return f"aten.{target._opname}.{target._overloadname}"
        return None
    for name, function in _PYTHON_FUNCTIONS.items():
        if function is target:
            return name
    return None


def resolve_function(name: str):
    """The callable an archive names (inverse of :func:`function_name`)."""
    if name in _PYTHON_FUNCTIONS:
        return _PYTHON_FUNCTIONS[name]
    namespace, _, rest = name.partition(".")
    packet, _, overload = rest.partition(".")
    if namespace != "aten" or packet not in ATEN_OPS:
        raise ValueError(f"operator {name!r} is not in the runtime's allowlist")
    try:
        operators = getattr(torch.ops.aten, packet)
    except AttributeError:
        raise ValueError(f"operator {name!r} does not exist in torch {torch.__version__}") from None
    if overload not in operators.overloads():  # not any attribute: '__init__' would run code
        raise ValueError(f"operator {name!r}: {overload!r} is not an overload of aten.{packet} in torch "
                         f"{torch.__version__}")
    return getattr(operators, overload)


class ExportedModel(nn.Module):
    """A frozen plain-PyTorch network with its certified Lipschitz bound.

    ``network`` is a ``torch.fx.GraphModule`` whose convolutions and dense layers are
    ``nn.Conv2d`` and ``nn.Linear`` holding the normalized weights. The model is always in
    eval mode, its parameters do not require gradients, and it only accepts inputs of shape
    ``(batch, *input_shape)``, the shape the weights were normalized and certified for.

    Attributes:
        input_shape: input shape without the batch dimension.
        lipschitz_bound: certified upper bound on the L2 Lipschitz constant (float64), or
            ``None`` when the model was exported without one.
        metadata: strings recorded at export time.
    """

    def __init__(self, network: torch.fx.GraphModule, *, input_shape, lipschitz_bound, metadata: dict,
                 modules: dict, nodes: list):
        super().__init__()
        self.network = network
        self.input_shape = tuple(int(s) for s in input_shape)
        self.lipschitz_bound = None if lipschitz_bound is None else float(lipschitz_bound)
        self.metadata = dict(metadata)
        self._spec = {"modules": modules, "nodes": nodes}
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"this exported model takes inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}: its weights and certificate are only valid for that shape"
            )
        return self.network(x)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("an exported model is a frozen inference snapshot: train the lipnet model and "
                               "export it again")
        return super().train(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Reached by load_state_dict on this model or on a module holding it, before its children
        # load: other weights would keep a bound and radii computed for these (its own are fine).
        for name, tensor in self.state_dict(prefix=prefix).items():
            loaded = state_dict.get(name)
            if loaded is not None and not (torch.is_tensor(loaded) and loaded.shape == tensor.shape
                                           and torch.equal(loaded.to(tensor.device, tensor.dtype), tensor)):
                raise RuntimeError(f"an exported model is a frozen inference snapshot: its lipschitz_bound holds for "
                                   f"the weights it was exported with, so it loads no others ({name} differs); load "
                                   "them into the lipnet model and export it again")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def certified_radius(self, logits: torch.Tensor) -> torch.Tensor:
        """Certified L2 radius of each prediction (the arg-max of its logits), float64.

        The same computation as ``lipnet.certify.certified_radius(logits, logits.argmax(1),
        lipschitz_bound)``: each logit is treated as uncertain by
        ``delta = LOGIT_ROUNDING_ULPS * eps(dtype) * max(1, max_j |z_j|)`` (the forward pass
        is in floating point; integer logits are exact up to ``2^53``, beyond which ``delta`` is
        half their float64 spacing), and the radius ``(z_top - z_second - 2 delta) / (sqrt(2) L)``
        is computed in float64 with the denominator rounded up and the quotient rounded
        down. A tie, or a margin below ``2 delta``, gives radius 0.

        ``delta`` is a heuristic allowance for a float32 forward pass without TF32 or bf16
        (generous on lipnet's networks, but it scales with the logits, not with the
        intermediate activations). For certificates with a proven rounding bound, certify the
        lipnet model with ``lipnet.certify.certified_accuracy``, which evaluates the same
        weights in float64.
        """
        if self.lipschitz_bound is None:
            raise ValueError("this model was exported with certify=False: it has no Lipschitz bound")
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"expected logits of shape (batch, classes >= 2), got {tuple(logits.shape)}")
        if torch._C._functorch.is_functorch_wrapped_tensor(logits):  # vmap, grad: not concrete values
            raise TypeError("certified_radius cannot run inside a torch.func transform (vmap, grad, ...): the radii "
                            "are computed from concrete logits; call it outside the transform, on the whole batch")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or inf: no radius can be certified")
        # Subnormals flushed to 0 (torch.set_flush_denormal(True), a CPU speed setting) would make a
        # bound below 2^-1022 a zero denominator and the radius infinite: flushing is off meanwhile.
        # Asked of the CPU (a default device of "cuda" would answer for the GPU, "meta" not at all).
        flushing = bool(torch.tensor(2.0 ** -1022, dtype=torch.float64, device="cpu") / 2 == 0)
        if flushing:
            torch.set_flush_denormal(False)
        try:
            return self._radius(logits)
        finally:
            if flushing:
                torch.set_flush_denormal(True)

    def _radius(self, logits: torch.Tensor) -> torch.Tensor:
        f = logits.detach().double()
        largest = f.abs().amax(dim=1)
        if logits.is_floating_point():
            delta = LOGIT_ROUNDING_ULPS * torch.finfo(logits.dtype).eps * largest.clamp_min(1.0)
        else:  # integers are exact, but float64 rounds them beyond 2^53 (by half its spacing)
            delta = torch.where(largest > 2.0**53, largest * 2.0**-53, 0.0)
        top = f.topk(2, dim=1).values
        margin = top[:, 0] - top[:, 1] - 2 * delta
        denominator = math.nextafter(math.sqrt(2) * self.lipschitz_bound, math.inf)
        if denominator == 0:
            return torch.where(margin > 0, torch.full_like(margin, math.inf), torch.zeros_like(margin))
        radius = torch.nextafter(margin / denominator, torch.zeros_like(margin))
        # A margin beyond the largest float (logits near +-1e308) overflows to inf: halve it (exact
        # for logits that large), divide, round towards 0 and double back.
        overflow = torch.isposinf(margin)
        if bool(overflow.any()):
            half = (top[:, 0] / 2 - top[:, 1] / 2 - delta) / denominator
            doubled = 2 * torch.nextafter(half, torch.zeros_like(half))
            radius = torch.where(overflow, doubled.clamp_max(torch.finfo(torch.float64).max), radius)
        return radius.clamp_min(0.0)

    def archive(self) -> dict:
        """The archive (see the module docstring), with tensors copied to the CPU."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "input_shape": self.input_shape,
            "lipschitz_bound": self.lipschitz_bound,
            "modules": self._spec["modules"],
            "nodes": self._spec["nodes"],
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "metadata": self.metadata,
        }

    def save(self, f) -> None:
        """``torch.save`` the archive; read it back with :func:`load`.

        A path is written atomically (:func:`atomic_save`), so an interrupted save never
        truncates an earlier archive; a file object is written as is.
        """
        if isinstance(f, (str, os.PathLike)):
            atomic_save(self.archive(), f)
        else:
            torch.save(self.archive(), f)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, lipschitz_bound={self.lipschitz_bound}"


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash leaves the old file or the new one, never a
    part (:func:`atomic_write`). Also used for lipnet's checkpoints (this file needs no lipnet)."""
    atomic_write(path, lambda out: torch.save(obj, out))


def atomic_write(path, write) -> None:
    """Write a file through ``write(binary_file)`` so that a crash leaves the old file or the new
    one, never a part.

    The bytes go to a temporary file ``.NAME.<pid>.<random>.tmp`` (NAME: the file's name, cut to
    200 bytes) in the same folder (with the permissions a plain ``open`` would give: those of the
    file it replaces, if any), which is flushed, fsynced and renamed over ``path``; then the
    folder is fsynced.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # else the error would name the temporary file
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: no such folder (create it first)", folder)
    if os.path.isdir(path):  # likewise
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder; name a file in it", path)
    name = os.fsdecode(os.fsencode(os.path.basename(path))[:200])  # leaves room in a 255-byte name for the rest
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    # Mode 0o666 less the process umask, applied by the system (as open() does; reading the
    # umask would mean setting it, which races with other threads creating files).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        _keep_mode(fd, path)
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        folder_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(folder_fd)
    except OSError as exc:  # file systems without folder fsync (EINVAL): the new file is in place
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(folder_fd)


def _keep_mode(fd: int, path: str) -> None:
    """Give the temporary file ``fd`` the permissions of the file it replaces, as writing ``path``
    in place would keep them (a private ``0o600`` file stays private)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a new file: the permissions os.open gave
        return
    if stat.S_ISREG(mode) and hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(mode))


def load(f, map_location=None, *, max_check_bytes: int = MAX_CHECK_BYTES) -> ExportedModel:
    """Read an archive with ``torch.load(f, weights_only=True)`` and :func:`build` it.

    ``f`` is a path or a file object; ``max_check_bytes`` as in :func:`build`. Raises
    ``ValueError`` for a damaged file (records that do not match their checksums, truncated, not
    a torch file) or an archive that is not a valid lipnet export; a file the system refuses to
    read (permission denied, I/O error), a missing file and a folder are their ``OSError``, not
    called damaged."""
    damaged = damaged_record(f)
    if damaged is not None:
        where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "the exported model"
        raise ValueError(f"{where} is damaged: {damaged}; export the model again or restore a copy")
    try:
        archive = torch.load(f, map_location=map_location, weights_only=True)
    except OSError as exc:
        if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)) or exc.errno == errno.EIO:
            raise  # the system refused, or there is no such file: nothing says the file is damaged
        raise ValueError(f"cannot read the exported model: the file is truncated, corrupt or not a torch file "
                         f"({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise ValueError(f"cannot read the exported model: the file is truncated, corrupt, not a torch file, or "
                         f"holds objects other than tensors and plain values ({type(exc).__name__}: {exc})") from exc
    return build(archive, max_check_bytes=max_check_bytes)


def damaged_record(f) -> str | None:
    """What is wrong with the zip archive ``torch.save`` wrote to ``f`` (a path, or a seekable
    binary file, read from its current position and put back there): a record whose bytes do
    not match its CRC-32, or an unreadable archive; else ``None``. ``torch.load`` does not
    check the checksums, and would read damaged tensor bytes as weights. Also used for
    checkpoints."""
    start = None
    if not isinstance(f, (str, os.PathLike)):
        if not (hasattr(f, "seekable") and f.seekable()):
            return None  # a stream: nothing to check before torch.load reads it
        start = f.tell()
    try:
        if not zipfile.is_zipfile(f):
            return None  # not an archive: torch.load says what it is
        if start is not None:
            f.seek(start)
        with zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"its archive cannot be read ({type(exc).__name__}: {exc})"
    finally:
        if start is not None:
            f.seek(start)
    if damaged is not None:
        return f"its record {damaged!r} does not match its checksum (the file changed after it was written)"
    return None


def build(archive: dict, *, max_check_bytes: int = MAX_CHECK_BYTES) -> ExportedModel:
    """Instantiate the network an archive describes (nothing in the archive is executed).

    The network is run once on a zero example to check it; first on the meta device, where
    nothing is allocated, to refuse an archive whose ``input_shape`` or graph (e.g. a ``zeros``
    node) would make that run's results take more than ``max_check_bytes`` in all (the sum of
    the sizes of every intermediate result; default :data:`MAX_CHECK_BYTES`).

    Then the stored bound is checked against a lower bound of the network's Lipschitz constant
    (the norm of its Jacobian at a seeded random input; see ``_check_bound``).

    Raises ``ValueError`` for anything but a well-formed archive of this format version."""
    if type(max_check_bytes) is not int or max_check_bytes < 1:
        raise ValueError(f"max_check_bytes must be a positive int, got {max_check_bytes!r}")
    if not isinstance(archive, dict) or archive.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} archive (expected a dict with format={FORMAT!r})")
    if archive.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"archive format version {archive.get('format_version')!r} is not supported by this "
                         f"runtime (version {FORMAT_VERSION})")
    missing = [key for key in ("state_dict", "modules", "nodes", "input_shape", "lipschitz_bound") if key not in archive]
    if missing:
        raise ValueError(f"the archive lacks {', '.join(missing)}: it is damaged or was not written by lipnet.export")
    try:
        # Outside inference mode, where the bound's check takes a gradient (under a caller's
        # torch.inference_mode() none could be taken, and a bound edited to 1/100 was accepted).
        with torch.inference_mode(False):
            return _build(archive, max_check_bytes)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed archive fails somewhere in torch: say so, uniformly
        raise ValueError(f"the archive is malformed ({type(exc).__name__}: {exc}): it is damaged or was not "
                         "written by lipnet.export") from exc


def _build(archive: dict, max_check_bytes: int) -> ExportedModel:
    bound = archive["lipschitz_bound"]
    # 0 is a constant network (e.g. a zero last layer): every prediction holds at any radius.
    if bound is not None and not (type(bound) in (int, float) and math.isfinite(bound) and bound >= 0):
        raise ValueError(f"the archive's lipschitz_bound must be a finite number >= 0 (or None), got {bound!r}: "
                         "no radius can be certified from it")
    input_shape = archive["input_shape"]
    if not (isinstance(input_shape, (list, tuple)) and input_shape
            and all(type(d) is int and d > 0 for d in input_shape)):
        raise ValueError(f"the archive's input_shape must be positive integers, got {input_shape!r}")
    metadata = archive.get("metadata", {})
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError("the archive's metadata must map strings to strings")
    state_dict, modules, nodes = archive["state_dict"], archive["modules"], archive["nodes"]
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items())):
        raise ValueError("the archive's state_dict must map names to tensors")
    _check_tensor_bytes(state_dict)
    non_finite = [k for k, v in state_dict.items()
                  if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(f"the archive holds non-finite (NaN or inf) values in {', '.join(non_finite)}: the network "
                         "it describes computes NaN or inf, and its bound means nothing; export the model again")
    if not isinstance(modules, dict):
        raise ValueError(f"the archive's modules must be a dict, got {type(modules).__name__}")
    root: dict = {}
    for name, spec in modules.items():
        _check_path(name, "module")
        if not (isinstance(spec, dict) and set(spec) == {"type", "kwargs"} and isinstance(spec["kwargs"], dict)):
            raise ValueError(f"module {name!r}: expected {{'type', 'kwargs'}}, got {spec!r:.200}")
        if spec["type"] not in MODULES:
            raise ValueError(f"module {name!r}: type {spec['type']!r} is not one of {sorted(MODULES)}")
        if "device" in spec["kwargs"]:
            raise ValueError(f"module {name!r}: its kwargs name a device; load(map_location=...) chooses it")
        # On the meta device: sizes from the archive allocate nothing (nor run an initialization)
        # before load_state_dict(assign=True) checks them against the archive's tensors.
        root[name] = MODULES[spec["type"]](**{k: decode(v) for k, v in spec["kwargs"].items()}, device="meta")
    if not (isinstance(nodes, list) and nodes and all(isinstance(n, dict) for n in nodes)):
        raise ValueError("the archive's nodes must be a non-empty list of dicts")
    ops = [spec.get("op") for spec in nodes]
    if ops[0] != "placeholder" or ops.count("placeholder") != 1 or ops.count("output") != 1 or ops[-1] != "output":
        raise ValueError("the archive's graph must take one input (its first node) and end with its one output node")
    graph = torch.fx.Graph()
    env: dict = {}
    stored: set = set()  # the nodes that are stored tensors or views of them
    for index, spec in enumerate(nodes):
        if set(spec) != {"name", "op", "target", "args", "kwargs"}:
            raise ValueError(f"node {index}: expected the keys name, op, target, args, kwargs, got {sorted(spec)}")
        name = spec["name"]
        if not isinstance(name, str) or name in env:
            raise ValueError(f"node {index}: its name {name!r} is not a string, or not unique")
        env[name] = _make_node(graph, spec, index, env, root, state_dict)
        _check_writes(env[name], stored, name)
        if bound is not None:
            _check_eval_mode(env[name], name)
    dtype, _ = _probe_kind(state_dict.values())
    # The layers in ``root`` are on the meta device until the real tensors are assigned below.
    meta_root = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in root.items()}
    meta_network = torch.fx.GraphModule(meta_root, graph, class_name="ExportedNetwork")
    meta_network.load_state_dict({k: v.to("meta") for k, v in state_dict.items()}, strict=True, assign=True)
    example_bytes = _check_sizes(meta_network, input_shape, dtype, max_check_bytes)
    network = torch.fx.GraphModule(root, graph, class_name="ExportedNetwork")
    # Tensors loaded under the caller's torch.inference_mode() are inference tensors, which cannot be
    # parameters outside it: copies that can.
    state_dict = {k: v.clone() if torch.is_tensor(v) and v.is_inference() else v for k, v in state_dict.items()}
    network.load_state_dict(state_dict, strict=True, assign=True)
    model = ExportedModel(network, input_shape=input_shape, lipschitz_bound=bound, metadata=metadata, modules=modules,
                          nodes=nodes)
    _check_runs(model)
    if bound is not None:
        _check_per_example(model, example_bytes, max_check_bytes)
        _check_bound(model, example_bytes, max_check_bytes)
    return model


def _check_tensor_bytes(state_dict: dict) -> None:
    """Refuse tensors whose elements take more bytes than the storages that hold them: a
    tensor of stride 0 (``torch.zeros(1).expand(2**16, 2**16)``), or many tensors viewing one
    storage, is a few bytes in the file but 16 GiB to every operation that reads it (the
    finiteness check first). An export saves each tensor dense and apart from the others."""
    stored, claimed = {}, 0
    for k, v in state_dict.items():
        if v.layout != torch.strided:
            raise ValueError(f"the archive's tensor {k!r} is {v.layout}, not dense: an export holds dense tensors")
        storage = v.untyped_storage()
        stored[(v.device, storage.data_ptr())] = storage.nbytes()
        claimed += v.numel() * v.element_size()
    held = sum(stored.values())
    if claimed > held:
        raise ValueError(f"the archive's tensors claim {claimed:,} bytes but their storages hold {held:,}: they "
                         "overlap (a stride of 0, or views of one storage), which no export writes")


class _MetaRun(torch.fx.Interpreter):
    """Runs a graph on the meta device (every device argument becomes ``meta``: nothing is
    allocated) and adds up the bytes of its results, stopping once they pass ``limit``."""

    def __init__(self, module: torch.fx.GraphModule, limit: int):
        super().__init__(module)
        self.limit, self.total = limit, 0

    def call_function(self, target, args, kwargs):
        if isinstance(target, torch._ops.OpOverload):
            meta = torch.device("meta")
            args = list(args)
            for i, argument in enumerate(target._schema.arguments):
                if str(argument.type) not in ("Device", "Optional[Device]", "Device?"):
                    continue
                if i < len(args) and args[i] is not None:
                    args[i] = meta
                elif kwargs.get(argument.name) is not None:
                    kwargs = {**kwargs, argument.name: meta}
        return super().call_function(target, tuple(args), kwargs)

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        sizes: list = []
        torch.fx.node.map_aggregate(result, lambda v: sizes.append(v.numel() * v.element_size())
                                    if torch.is_tensor(v) else None)
        self.total += sum(sizes)
        if self.total > self.limit:
            raise _TooLarge(f"{self.total / 2 ** 20:,.0f} MiB by node {n.name} ({n.target})")
        return result


class _TooLarge(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what  # torch.fx appends the graph's listing to the message


def _check_sizes(network: torch.fx.GraphModule, input_shape: list, dtype: torch.dtype, limit: int) -> int:
    """Refuse a graph whose run on one zero example would take more than ``limit`` bytes
    (the sum of its results' sizes), measured on the meta device before any real run; else
    return those bytes."""
    x = torch.empty(1, *input_shape, dtype=dtype, device="meta")
    run = _MetaRun(network, limit)
    try:
        if x.numel() * x.element_size() > limit:
            raise _TooLarge(f"{x.numel() * x.element_size() / 2 ** 20:,.0f} MiB for the input alone")
        with torch.no_grad():
            run.run(x)
        return run.total
    except _TooLarge as exc:
        raise ValueError(f"checking the archive's graph on one example of its input_shape {tuple(input_shape)} "
                         f"would take more than max_check_bytes = {limit:,} bytes ({exc.what}): the file claims a "
                         "larger network than any export makes, or load it with a larger max_check_bytes") from None
    except Exception as exc:  # noqa: BLE001 - whatever fails, the archive is what is wrong
        raise _does_not_run(input_shape, exc) from exc


def _probe_kind(tensors) -> tuple[torch.dtype, torch.device | str]:
    """The dtype and device of the zero example the checks run: the first floating tensor's."""
    first = next((t for t in tensors if t.is_floating_point()), None)
    return (first.dtype, first.device) if first is not None else (torch.float32, "cpu")


def _does_not_run(input_shape, exc: Exception) -> ValueError:
    return ValueError(f"the archive's graph does not run on an input of shape (1, {', '.join(map(str, input_shape))}) "
                      f"({type(exc).__name__}: {exc}): it is damaged or was not written by lipnet.export")


def _check_runs(model: ExportedModel) -> None:
    """One forward pass on a zero input: a graph whose operators get arguments they do not take,
    or that returns anything but one tensor, fails at load instead of at its first use."""
    dtype, device = _probe_kind(model.network.state_dict().values())
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *model.input_shape, dtype=dtype, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever fails, the archive is what is wrong
        raise _does_not_run(model.input_shape, exc) from exc
    if not (torch.is_tensor(out) and out.dim() >= 1 and out.shape[0] == 1):
        raise ValueError(f"the archive's graph must return one tensor with the input's batch dimension, got "
                         f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")


def _check_per_example(model: ExportedModel, example_bytes: int, limit: int) -> None:
    """Refuse a certified network whose output for one example depends on the rest of its batch
    (two seeded examples run together and apart differ by more than rounding): its bound is a
    bound of one example's function, which such a network does not have. Skipped when a batch
    of two would take more than ``limit`` bytes."""
    dtype, device = _probe_kind(model.network.state_dict().values())
    if not dtype.is_floating_point or 2 * example_bytes > limit:
        return
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1), dtype=dtype,
                    device="cpu").to(device)
    with torch.no_grad():  # copies: a graph may write to its input (ReLU(inplace=True) first)
        together, apart = model(x.clone()), torch.cat([model(x[:1].clone()), model(x[1:].clone())])
    if together.shape != apart.shape or not together.is_floating_point():
        return  # the check at load refuses the first; the second has no gradient to bound
    same = (together == apart) | (together.isnan() & apart.isnan())  # inf and NaN outputs alike
    difference = float(torch.where(same, 0.0, (together - apart).abs()).max())
    scale = 1 + float(together.nan_to_num(0.0, 0.0, 0.0).abs().max())
    if not difference <= max(1e-3, 64 * torch.finfo(dtype).eps) * scale:
        raise ValueError("the archive's network computes an example's output from the other examples of its batch "
                         "as well: a Lipschitz bound of one example's function cannot hold for it, and no export "
                         "with a bound does this (a model that needs it can be exported with certify=False)")


def _check_bound(model: ExportedModel, example_bytes: int, limit: int) -> None:
    """Refuse a stored bound below a lower bound of the network's Lipschitz constant: the
    spectral norm of ``Q^T J``, where ``J`` is the network's Jacobian at a seeded normal input
    and ``Q`` has up to ``_JACOBIAN_ROWS`` orthonormal columns (all of them, so the exact
    norm of ``J``, for outputs that small), from one backward pass of a batch of that many
    rows (fewer when their results would pass ``limit`` bytes; no check when one row would).
    ``||Q^T J|| <= ||J|| <= L`` for a true bound ``L``; ``_JACOBIAN_SLACK`` units of the dtype's
    epsilon (at least 1e-3, relative) allow for the rounding of the computed Jacobian. A
    network autograd cannot differentiate, or whose Jacobian there is not finite, is not
    checked. This catches a bound or weights edited by a large factor, not every false bound:
    the certificate is still as trustworthy as the file's origin."""
    dtype, device = _probe_kind(model.network.state_dict().values())
    if not dtype.is_floating_point or 3 * example_bytes > limit:
        return
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, *model.input_shape, generator=generator, dtype=dtype, device="cpu").to(device)
    with torch.no_grad():
        outputs = model(x.clone())[0].numel()
    if outputs == 0:
        return
    rows = min(outputs, _JACOBIAN_ROWS, limit // max(1, 3 * example_bytes))
    q = torch.linalg.qr(torch.randn(outputs, rows, generator=generator, dtype=torch.float64, device="cpu")).Q
    x = x.expand(rows, *model.input_shape).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            y = model(x.clone())  # a graph may write to its input, not to a leaf that requires grad
            (rows_of_qj,) = torch.autograd.grad(y, x, q.T.reshape(y.shape).to(y.dtype))
    except Exception:  # noqa: BLE001 - an operator without a derivative: no lower bound from here
        return
    lower = float(torch.linalg.matrix_norm(rows_of_qj.reshape(rows, -1).double(), ord=2))
    if not math.isfinite(lower):  # a non-differentiable point (sqrt at 0): no evidence either way
        return
    slack = max(1e-3, _JACOBIAN_SLACK * torch.finfo(dtype).eps)
    if not lower <= model.lipschitz_bound * (1 + slack):
        raise ValueError(f"the archive's lipschitz_bound {model.lipschitz_bound!r} is false: the network's Jacobian "
                         f"at an input has spectral norm >= {lower:.6g}; its weights, graph or bound were edited, "
                         "so no radius it gives can be trusted: export the model again")


def _check_path(path, what: str) -> None:
    """A module or tensor path must be dotted plain identifiers or indices (``layers.0.weight``):
    it becomes attribute access in the code torch.fx generates."""
    def plain(part: str) -> bool:
        if part.isascii() and part.isdecimal():
            return True
        return part.isidentifier() and not keyword.iskeyword(part) and not part.startswith("__")
    if not (isinstance(path, str) and path and all(plain(part) for part in path.split("."))):
        raise ValueError(f"{what} path {path!r} is not a dotted name of plain identifiers and indices")


def _make_node(graph: torch.fx.Graph, spec: dict, index: int, env: dict, root: dict,
               state_dict: dict) -> torch.fx.Node:
    """The graph node of ``spec``, named by the runtime (``input``, ``n<index>``): the archive's
    names only key ``env``."""
    op, target, name = spec["op"], spec["target"], spec["name"]
    if not isinstance(spec["args"], list) or not isinstance(spec["kwargs"], dict):
        raise ValueError(f"node {name!r}: args must be a list and kwargs a dict")
    args = tuple(decode(spec["args"], env))
    kwargs = decode(spec["kwargs"], env)
    if _holds_tensor((args, kwargs)):
        raise ValueError(f"node {name!r}: tensors enter the graph through get_attr nodes, not as arguments")
    if op == "placeholder":
        if args or kwargs:
            raise ValueError(f"node {name!r}: the input takes no arguments")
        return graph.placeholder("input")
    if op == "output":
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.fx.Node):
            raise ValueError(f"node {name!r}: the output must return one node")
        return graph.output(args[0])
    if op == "call_function":
        target = resolve_function(target)
        allowed = {a.name for a in target._schema.arguments} if isinstance(target, torch._ops.OpOverload) else set()
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"node {name!r}: {spec['target']} takes no keyword argument(s) {unknown}")
    elif op == "call_module":
        _check_path(target, "module")
        if target not in root or not isinstance(root[target], nn.Module):
            raise ValueError(f"node {name!r} calls module {target!r}, which the archive does not define")
        if kwargs:
            raise ValueError(f"node {name!r}: modules are called without keyword arguments")
    elif op == "get_attr":
        _check_path(target, "tensor")
        if target not in state_dict:
            raise ValueError(f"node {name!r} reads tensor {target!r}, which the state dict does not hold")
        if args or kwargs:
            raise ValueError(f"node {name!r}: reading a tensor takes no arguments")
        root[target] = state_dict[target]
    else:
        raise ValueError(f"node {name!r}: unsupported op {op!r}")
    return graph.create_node(op, target, args, kwargs, name=f"n{index}")


def _training_flag(node: torch.fx.Node):
    """The value of ``node``'s argument ``train`` or ``training`` (``False`` if it has none)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    for i, argument in enumerate(node.target._schema.arguments):
        if argument.name in ("train", "training"):
            return node.args[i] if i < len(node.args) else node.kwargs.get(argument.name, argument.default_value)
    return False


def _check_eval_mode(node: torch.fx.Node, name: str) -> None:
    """Refuse, in a certified archive, an operator called in training mode (an argument ``train``
    or ``training`` that is not ``False``): dropout is then random and batch norm normalizes by
    the batch's statistics, so no bound on one example's function holds. A model exported with
    ``certify=False`` may keep them (``BatchNorm2d(track_running_stats=False)``)."""
    flag = _training_flag(node)
    if flag is not False:
        raise ValueError(f"node {name!r}: {node.target} is called with training={flag!r}: it is then random or "
                         "depends on the batch, so the archive's lipschitz_bound cannot hold; a certified export "
                         "is always in eval mode")


def _check_writes(node: torch.fx.Node, stored: set, name: str) -> None:
    """Refuse an operator that writes to a stored tensor or a view of one (the network would
    change at every call, away from the weights its bound was computed for), and record in
    ``stored`` the views of stored tensors that ``node`` returns."""
    if node.op == "get_attr":
        stored.add(node)
    elif node.op == "call_function" and node.target is operator.getitem:
        if node.args and node.args[0] in stored:  # an item of chunk / split / unbind of a stored tensor
            stored.add(node)
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        aliased = False
        for i, argument in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            inputs: list = []
            torch.fx.node.map_arg(value, inputs.append)
            # Batch norm in training mode updates its running statistics in place, unmarked in its schema.
            writes_stats = argument.name in ("running_mean", "running_var") and _training_flag(node) is not False
            if writes_stats and any(n in stored for n in inputs):
                raise ValueError(f"node {name!r}: {node.target} in training mode writes to the stored tensor it "
                                 f"takes as {argument.name}: the network would change at every call; an export "
                                 "never does this")
            if argument.alias_info is None or not any(n in stored for n in inputs):
                continue
            if argument.alias_info.is_write:
                raise ValueError(f"node {name!r}: {node.target} writes to a stored tensor (or a view of one): the "
                                 "network would change at every call; an export never does this")
            aliased = True
        if aliased and any(r.alias_info is not None for r in schema.returns):
            stored.add(node)


def _holds_tensor(value) -> bool:
    if torch.is_tensor(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def encode(value):
    """Plain-data form of a graph argument (inverse of :func:`decode`)."""
    if isinstance(value, torch.fx.Node):
        return {"$node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [encode(v) for v in value]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("$") for k in value):
            raise TypeError(f"cannot encode a dict with keys {list(value)}")
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, slice):
        return {"$slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    for tag, kind in _TAGGED_TYPES.items():
        if isinstance(value, kind):
            return {tag: str(value).removeprefix("torch.")}
    raise TypeError(f"cannot encode {type(value).__name__} {value!r} as plain data")


_TAGGED_TYPES = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format,
                 "$device": torch.device}


def decode(value, env: dict | None = None):
    """Python value of an encoded graph argument; ``env`` maps node names to graph nodes."""
    if isinstance(value, list):
        return [decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, payload), = value.items()
        if tag == "$node":
            if env is None or payload not in env:
                raise ValueError(f"reference to undefined node {payload!r}")
            return env[payload]
        if tag == "$tuple":
            return tuple(decode(v, env) for v in payload)
        if tag == "$slice":
            return slice(*(decode(v, env) for v in payload))
        if tag == "$device":
            return torch.device(payload)
        if tag in _TAGGED_TYPES:
            result = getattr(torch, payload, None)
            if not isinstance(result, _TAGGED_TYPES[tag]):
                raise ValueError(f"unknown {tag[1:]} {payload!r}")
            return result
    return {k: decode(v, env) for k, v in value.items()}
