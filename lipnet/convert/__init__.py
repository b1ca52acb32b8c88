"""Convert an existing PyTorch model to lipnet layers, and say what still stands in the way.

:func:`convert` swaps every ``nn.Conv2d`` for a :class:`~lipnet.nn.GramConv2d`, every ``nn.Conv1d``
for a :class:`~lipnet.nn.GramConv1d`, every ``nn.ConvTranspose2d`` for a
:class:`~lipnet.nn.GramConvTranspose2d` and every ``nn.Linear`` for a :class:`~lipnet.nn.GramLinear`
(same arguments, same weights), and
optionally every ``nn.ReLU`` for :class:`~lipnet.nn.MaxMin`. It returns the converted copy
and a :class:`ConversionReport` listing each change and each module that keeps the model
from being certifiably 1-Lipschitz, with the 1-Lipschitz replacement lipnet offers.

Containers with their own ``forward`` (torchvision's ``ResNet`` and ``BasicBlock``, user
modules) are analysed with ``torch.fx``: :func:`traced_lipschitz_bound` bounds them from the
graph of their forward, and :func:`convert` registers it with
:func:`lipnet.certify.register_lipschitz_bound` for such types, so that
:func:`lipnet.certify.lipschitz_bound` can certify the converted model. Residual additions
are not compositions: ``x + f(x)`` is bounded by ``1 + Lip(f)``, so a network of ``k`` plain
residual blocks may have a bound of ``2^k``; the report says so.
"""

from lipnet.convert.conversion import convert
from lipnet.convert.report import Change, Conversion, ConversionReport, Obstacle
from lipnet.convert.traced_bound import traced_lipschitz_bound

__all__ = ["Change", "Conversion", "ConversionReport", "Obstacle", "convert", "traced_lipschitz_bound"]
