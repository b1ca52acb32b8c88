"""torch's wrapper modules are unwrapped, modules that only look like them are not."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lipnet.models import build_model, model_spec, unwrap
from lipnet.models.wrappers import wrapped_module, wrapper_chain


def test_torch_wrappers_are_unwrapped_however_nested():
    net = nn.Linear(3, 2)
    compiled = torch.compile(net)
    assert unwrap(compiled) is net
    averaged = AveragedModel(nn.DataParallel(net))  # it holds a copy
    assert unwrap(averaged) is averaged.module.module
    assert wrapper_chain(nn.DataParallel(compiled))[1:] == [compiled, net]


class OwnWeights(nn.Module):
    """A user's module whose child happens to be named like torch.compile's."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner
        self.gain = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.gain * self._orig_mod(x)


class Doubled(nn.DataParallel):
    def forward(self, *inputs, **kwargs):
        return 2 * super().forward(*inputs, **kwargs)


@pytest.mark.parametrize("make", [OwnWeights, Doubled], ids=["orig_mod-child", "DataParallel-own-forward"])
def test_look_alikes_are_kept_whole(make):
    outer = make(nn.Linear(3, 2))
    assert wrapped_module(outer) is None
    assert unwrap(outer) is outer


def test_saving_a_look_alike_does_not_drop_its_weights():
    # model_spec (used when a checkpoint is written) once unwrapped any module with an _orig_mod
    # child, and saved the inner model's weights without the wrapper's gain.
    net = build_model("convnet-xs", in_channels=1, num_classes=10, input_size=28)
    assert model_spec(torch.compile(net))["name"] == "convnet-xs"
    with pytest.raises(ValueError, match="OwnWeights was not built by lipnet.models.build_model"):
        model_spec(OwnWeights(net))


class Gathered(nn.DataParallel):
    """Keeps DataParallel's forward, but changes what it gathers from the replicas."""

    def gather(self, outputs, output_device):
        return 2 * super().gather(outputs, output_device)


class Named(nn.DataParallel):
    def __init__(self, module):
        super().__init__(module)
        self.label = "run 3"  # data, not behaviour


def test_a_subclass_overriding_a_method_forward_calls_is_not_a_wrapper():
    inner = nn.Linear(3, 2)
    assert wrapped_module(Gathered(inner)) is None
    assert wrapped_module(Named(inner)) is inner  # only __init__ and attributes: still the wrapper


class Ema(AveragedModel):
    def update_parameters(self, model):  # an EMA's own averaging: no output changes
        super().update_parameters(model)


def test_an_averaged_model_with_its_own_averaging_is_still_a_wrapper():
    ema = Ema(nn.Linear(3, 2))
    assert wrapped_module(ema) is ema.module
