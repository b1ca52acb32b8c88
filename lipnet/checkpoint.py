"""Self-describing checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain Python values and tensors::

    {"format": "lipnet-checkpoint", "version": 1,
     "model": {"name": <registered architecture>, "kwargs": {...}},   # see lipnet.models
     "state_dict": {...},                                             # the model's weights
     "info": {...},                                                   # data set, config, metrics
     "training": {...}}                                               # optional: optimizer, RNG, epoch

so :func:`load_model` rebuilds the model without the code that trained it, and nothing in
it needs unpickling arbitrary objects.
"""

from __future__ import annotations

import collections
import errno
import os
import re
from pathlib import Path

import torch
from torch import nn

from lipnet.export.runtime import atomic_save, damaged_record
from lipnet.models import build_model, model_spec, unwrap

FORMAT = "lipnet-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, not a lipnet checkpoint, or holds non-finite weights."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced and then
    renamed over ``path`` (``os.replace``), and the folder is fsynced: a crash at any moment
    leaves either the old checkpoint or the new one, never a truncated file.

    Raises:
        TypeError: ``payload`` holds a value ``torch.load(weights_only=True)`` would not read
            back (nothing is written).
        OSError: ``path`` is a folder, its folder cannot be made, or the write failed (disk
            full, no permission); the message names ``path``, and a previous file there is kept.
    """
    path = Path(path)
    try:
        _check_plain(payload, "payload", set())  # a value torch.load(weights_only=True) refuses would lose the run
    except RecursionError:  # pickle would fail on it too, after the file was opened
        raise TypeError("cannot save payload: it is nested too deeply (thousands of levels); store a flatter "
                        "structure") from None
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save a checkpoint to {path}: it is a folder; name a file in it, "
                                f"e.g. {path / 'checkpoint.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's message would name the parent alone
        raise NotADirectoryError(errno.ENOTDIR, f"cannot save a checkpoint to {path}: {path.parent} is a file (or a "
                                 "broken link), not a folder") from None
    try:
        atomic_save(payload, path)
    except OSError as exc:  # the system's message names the temporary file, or no file at all
        raise OSError(exc.errno, f"cannot save a checkpoint to {path}: {exc.strerror or exc}") from exc
    return path


_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value, where: str, within: set) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not read back, or that hold no
    values (a tensor on the meta device); ``within``: the containers ``value`` is inside."""
    if type(value) in (torch.Tensor, nn.Parameter):  # a subclass of Tensor is refused by the loader
        if value.is_meta:
            raise TypeError(f"cannot save {where}: a tensor on the meta device holds no values (a model built "
                            "with device='meta' and never given weights?)")
        return
    if type(value) in _PLAIN:
        return
    if type(value) in (dict, collections.OrderedDict, list, tuple):
        if id(value) in within:
            raise TypeError(f"cannot save {where}: it contains itself; store a tree of plain values")
        within = within | {id(value)}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict):
                _check_plain(key, f"{where} key {key!r}", within)
            _check_plain(item, f"{where}[{key!r}]", within)
        return
    raise TypeError(f"cannot save {where}: a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}) would "
                    "not load with torch.load(weights_only=True); store plain Python values and tensors (e.g. "
                    "float(x), str(path))")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that saves killed mid-write left in ``folder``:
    ``.NAME.<pid>.<12 hex digits>.tmp``, exactly as :func:`~lipnet.export.runtime.atomic_write`
    names them (other hidden ``.tmp`` files, e.g. a user's, are kept).

    Call it only when no other process is saving into ``folder``. Returns what was removed.
    """
    folder = Path(folder)
    ours = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{12}\.tmp")
    stale = sorted(p for p in folder.glob(".*.tmp") if ours.fullmatch(p.name) and p.is_file()) if folder.is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read and validate a checkpoint written by :func:`save_checkpoint` / :func:`save_model`.

    ``map_location`` is passed to ``torch.load``: a device (``"cpu"``, ``"cuda:1"``,
    :class:`torch.device`), a dict mapping devices, or a function of ``(storage, location)``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or not a lipnet checkpoint.
        ValueError, TypeError: ``map_location`` is no device, dict or function, or one that
            ``torch.load`` cannot place tensors on.
    """
    path = Path(path)
    _check_map_location(map_location)
    if path.is_dir():
        hint = next((f"; did you mean {path / name}?" for name in ("model.pt", "checkpoint.pt") if (path / name).is_file()), "")
        raise CheckpointError(f"{path.absolute()} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        if path.is_symlink():
            raise CheckpointError(f"no checkpoint at {path.absolute()}: it is a symbolic link to {os.readlink(path)}, "
                                  "which does not lead to a file (missing, or a loop of links)")
        raise CheckpointError(f"no checkpoint at {path.absolute()}")
    _check_integrity(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        if not (isinstance(exc, PermissionError) or exc.errno == errno.EIO):
            raise CheckpointError(_unreadable(path, exc)) from exc
        # The system refused: the file may be fine, so it is not called corrupt (and deleted).
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        if map_location is not None and "restore data location" in str(exc):  # a valid device torch.load refuses
            raise ValueError(f"cannot load checkpoint {path} with map_location={map_location!r}: "
                             f"{str(exc).splitlines()[0]}; pass 'cpu' or 'cuda:N'") from exc
        raise CheckpointError(_unreadable(path, exc)) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lipnet checkpoint (no format tag {FORMAT!r}); "
                              "save models with lipnet.checkpoint.save_model")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this lipnet reads {VERSION}")
    spec = payload.get("model")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs"), dict)
            and isinstance(payload.get("state_dict"), dict)):
        raise CheckpointError(f"{path} lacks a model spec ({{'name', 'kwargs'}}) or a state_dict")
    if not isinstance(payload.get("info", {}), dict | None):
        raise CheckpointError(f"{path}: its 'info' is a {type(payload['info']).__name__}, not a dict of plain values")
    return payload


def _check_map_location(map_location) -> None:
    """Refuse a ``map_location`` that ``torch.load`` cannot use before it reads the file: its
    error would make a good checkpoint look corrupt."""
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except RuntimeError as exc:
            raise ValueError(f"map_location={map_location!r} is not a device: pass 'cpu', 'cuda', 'cuda:1', ... "
                             f"({exc})") from None
    elif not (map_location is None or isinstance(map_location, (torch.device, dict)) or callable(map_location)):
        raise TypeError(f"map_location must be a device ('cpu', 'cuda:1', a torch.device), a dict of devices or a "
                        f"function of (storage, location), got {map_location!r}")


def _check_integrity(path: Path) -> None:
    """Refuse a checkpoint whose zip records do not match their CRC-32 (:func:`damaged_record`)."""
    damaged = damaged_record(path)
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {damaged}; restore it from a copy or retrain")


def _unreadable(path: Path, exc: Exception) -> str:
    """The message for a checkpoint ``torch.load`` could not read."""
    text = str(exc)
    if "torch.cuda.is_available() is False" in text or ("CUDA" in text and "map_location" in text):
        return (f"cannot read checkpoint {path} onto a CUDA device: this machine has none; pass map_location='cpu' "
                "(or --device cpu)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch's first line after a refused global suggests weights_only=False: not for files of unknown origin.
    detail = "; ".join(line for line in lines if "Unsupported global" in line or "weights_only" not in line)[:300]
    return (f"cannot read checkpoint {path}: it is truncated, corrupt, not a torch file, or holds objects other than "
            f"tensors and plain values ({type(exc).__name__}{': ' + detail if detail else ''})")


def _kind(tensor: torch.Tensor) -> str:
    """The kind of number a tensor holds: its values survive a cast within a kind only."""
    if tensor.is_complex():
        return "complex"
    if tensor.is_floating_point():
        return "real"
    return "bool" if tensor.dtype == torch.bool else "integer"


def _misfits(weights: dict, expected: dict) -> list[str]:
    """The weights of another shape than the model's (``expected``: its state dict), or of another
    kind of number, which ``load_state_dict`` would cast (dropping imaginary parts, rounding)."""
    misfits = []
    for name, tensor in weights.items():
        if not (torch.is_tensor(tensor) and name in expected):
            continue  # a name the model lacks, or a value that is no tensor: load_state_dict names it
        if _kind(tensor) != _kind(expected[name]):
            misfits.append(f"{name} ({tensor.dtype}, the model holds {expected[name].dtype})")
        elif tensor.shape != expected[name].shape:
            misfits.append(f"{name} (shape {tuple(tensor.shape)}, the model's is {tuple(expected[name].shape)})")
    return misfits


def model_payload(model: nn.Module, **info) -> dict:
    """The checkpoint dict of a model built by :func:`lipnet.models.build_model`."""
    model = unwrap(model)
    return {"format": FORMAT, "version": VERSION, "model": model_spec(model),
            "state_dict": model.state_dict(), "info": info}


def save_model(path: str | os.PathLike, model: nn.Module, **info) -> Path:
    """Save a model (spec + weights + plain ``info``) atomically; :func:`load_model` reads it back.

    Example:
        >>> from lipnet.models import build_model
        >>> net = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
        >>> path = save_model(tmp_path / "net.pt", net, dataset="fashion-mnist")  # doctest: +SKIP
        >>> model, info = load_model(path)                                         # doctest: +SKIP
    """
    return save_checkpoint(path, model_payload(model, **info))


def load_model(path: str | os.PathLike, *, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint: ``(model in eval mode, info)``.

    Works on the final ``model.pt`` of a run and on its training ``checkpoint.pt``. ``info``
    holds what the writer stored (data set, config, metrics, epoch). The model is put on the
    device ``map_location`` (as in :func:`load_checkpoint`) put its weights on.

    Raises:
        CheckpointError: unreadable file, unknown architecture, weights that do not fit the
            architecture, or weights that are NaN or infinite.
    """
    payload = load_checkpoint(path, map_location=map_location)
    spec = payload["model"]
    try:
        # First on the meta device (shapes, no memory): a spec that disagrees with its weights, such
        # as a width of 10**6, fails before gigabytes are allocated and initialized.
        with torch.device("meta"):
            expected = build_model(spec["name"], **spec["kwargs"]).state_dict()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild model {spec['name']!r} from {spec['kwargs']}: {exc}") from exc
    misfits = _misfits(payload["state_dict"], expected)
    if misfits:
        raise CheckpointError(f"{path}: the weights do not fit model {spec['name']!r}: {', '.join(misfits)}")
    model = build_model(spec["name"], **spec["kwargs"])
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit model {spec['name']!r}: {exc}") from exc
    # Checked as loaded, after the cast to the model's dtype: a float64 1e300 becomes inf in float32.
    bad = [name for name, t in model.state_dict().items()
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite (NaN or inf) values in {', '.join(bad)}; the run that wrote it "
                              "had diverged: use an earlier checkpoint or retrain with a lower learning rate")
    info = dict(payload.get("info") or {})
    # The model goes where map_location put the weights (it may be a dict or a function, not a device).
    devices = {t.device for t in payload["state_dict"].values() if torch.is_tensor(t)}
    return model.to(devices.pop() if len(devices) == 1 else "cpu").eval(), info


