"""lipnet: provably L2-robust neural networks in PyTorch.

Layers (:mod:`lipnet.nn`) divide their weights by sound Gram-iteration bounds on their
operator norms (:mod:`lipnet.bounds`), so networks built from them are 1-Lipschitz and
their predictions come with certified L2 robustness radii.
"""

from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear

__version__ = "0.1.0"

# After the layers and the version: convert and export import lipnet.certify, which uses them.
# Each function is bound under its package's name, and answers for the package too
# (``lipnet.export.load``, ``import lipnet.export.runtime as rt``).
from lipnet.convert import convert as _convert  # noqa: E402
from lipnet.export import export as _export  # noqa: E402
from lipnet.package_function import PackageFunction  # noqa: E402

convert = PackageFunction(_convert, "lipnet.convert")
export = PackageFunction(_export, "lipnet.export")

__all__ = ["GramConv1d", "GramConv2d", "GramConvTranspose2d", "GramLinear", "__version__", "convert", "export"]
