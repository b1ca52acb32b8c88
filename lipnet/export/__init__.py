"""Export lipnet models to plain PyTorch: :func:`export` and the standalone :mod:`~lipnet.export.runtime`."""

from lipnet.export.exporter import export
from lipnet.export.runtime import ExportedModel, load

__all__ = ["ExportedModel", "export", "load"]
