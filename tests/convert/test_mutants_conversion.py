"""Mutation-testing gaps of :func:`lipnet.convert` (conversion.py, replacement.py): mutants of the
conversion that the other tests of tests/convert let live.

They pin: the checks of ``replace`` and ``n_iter``; ``n_iter`` reaching the new layers; a model
that is itself a layer being returned converted; the layer settings a Gram layer must carry over
(dilation, padding mode, output padding, bias), checked by what the converted layer computes; the
diagnosis of modules that ``replace`` put in; and the report notes about the ReLUs' channels.
"""

import copy

import pytest
import torch
from torch import nn

from lipnet import convert
from lipnet.nn import GramConv1d, GramConv2d, GramConvTranspose2d, GramLinear

F64 = torch.float64


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("replace", [{nn.Flatten: 3}, {int: lambda m: nn.Identity()}],
                         ids=["value not callable", "key not a module type"])
def test_replace_must_map_module_types_to_callables(replace):
    """A non-callable replacement, or a key that is a type but no nn.Module type, is refused up
    front with a TypeError naming ``replace`` (the existing test passes a string key only)."""
    net = small_cnn()
    with pytest.raises(TypeError, match="replace must map nn.Module types to callables"):
        convert(net, replace=replace)


def test_n_iter_must_be_an_integer():
    """``n_iter=2.0`` is refused by convert itself: otherwise each Gram layer refuses it, and
    convert turns that ValueError into a note "not converted", leaving every layer unnormalized."""
    with pytest.raises(ValueError, match="n_iter must be an integer >= 1, got 2.0"):
        convert(small_cnn(), n_iter=2.0)


def test_the_new_layers_get_the_given_n_iter():
    """Every Gram layer convert makes runs the number of Gram iterations given to it."""
    converted, _ = convert(nn.Sequential(small_cnn(), nn.Conv1d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1)), n_iter=3)
    layers = [m for m in converted.modules() if isinstance(m, (GramConv1d, GramConv2d, GramConvTranspose2d,
                                                                 GramLinear))]
    assert len(layers) == 4 and {m.n_iter for m in layers} == {3}


# ----------------------------------------------------------------------------- a model that is a layer


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_model_that_is_itself_a_layer_is_returned_converted(inplace):
    """``convert(nn.Linear(...))`` returns the GramLinear, with the weights (also with
    ``inplace=True``: "the returned model is model, unless model is itself a layer that gets
    replaced"), and its report names the model ``<model>``."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    weight = layer.weight.detach().clone()
    converted, report = convert(layer, input_shape=(4,), inplace=inplace)
    assert type(converted) is GramLinear and torch.equal(converted.weight, weight)
    assert [c.path for c in report.changes] == [""] and report.changes[0].old.startswith("Linear(")
    assert "  <model>: Linear(in_features=4" in str(report)
    assert report.lipschitz_bound <= 1 + 1e-5


# ----------------------------------------------------------------------------- layer settings


LAYERS = {
    "Conv2d reflect, dilation 2, groups 2, no bias": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect"), (4, 7, 7)),
    "Conv2d circular, stride 2": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="circular"), (2, 6, 6)),
    "Conv1d replicate, dilation 2, no bias": (
        lambda: nn.Conv1d(2, 4, 3, padding=2, dilation=2, bias=False, padding_mode="replicate"), (2, 9)),
    "ConvTranspose2d dilation 2, output_padding 1, groups 2, no bias": (
        lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2, bias=False),
        (4, 3, 3)),
    "Linear, no bias": (lambda: nn.Linear(5, 3, bias=False), (5,)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_a_converted_layer_computes_the_original_layer_with_its_normalized_weight(name):
    """The Gram layer applies the original layer, with every setting (padding mode, dilation,
    groups, output padding, bias or none), to the weight it normalizes: a setting dropped in the
    swap (a default dilation, zero padding, an added bias) changes the function."""
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    old = make().double().eval()
    converted, _ = convert(nn.Sequential(old))
    new = converted[0]
    assert (new.bias is None) == (old.bias is None)
    x = torch.randn(2, *shape, dtype=F64)
    with torch.no_grad():
        y = new(x)
        reference = copy.deepcopy(old)
        reference.weight.copy_(new.normalized_weight())
        torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(new.normalized_weight(), old.weight)  # the weight is normalized indeed


# ----------------------------------------------------------------------------- diagnosis after replace


def test_a_module_put_in_by_replace_is_diagnosed_at_the_shape_it_receives():
    """The diagnosis reads the input shapes of the converted model, not of the one before: a
    replacement that is not 1-Lipschitz (an overlapping max pooling in place of a BatchNorm) is
    reported with its bound."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    _, report = convert(net, input_shape=(2, 6, 6), replace={nn.BatchNorm2d: lambda m: nn.MaxPool2d(3, 1, 1)})
    (found,) = report.obstacles
    assert found.path == "1" and found.module == "torch.nn.MaxPool2d" and not found.blocking
    assert "Lipschitz bound 3" in found.problem
    assert report.lipschitz_bound == pytest.approx(3, rel=1e-4)


# ----------------------------------------------------------------------------- notes


def test_with_an_input_shape_the_report_does_not_say_the_channels_were_unchecked():
    """The note "ReLU channel counts were not checked" is for conversions without an input shape."""
    _, report = convert(small_cnn(), input_shape=(3, 4, 4))
    assert not any("not checked" in note for note in report.notes)
    _, report = convert(small_cnn())
    assert any("ReLU channel counts were not checked" in note for note in report.notes)


# ----------------------------------------------------------------------------- registration


#: convert registers traced bounds process-wide: each test restores the registry (tests/convert/conftest.py).
pytestmark = pytest.mark.usefixtures("registry")


class Unknown(nn.Module):
    """A leaf lipnet.certify knows nothing about."""

    def forward(self, x):
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Unknown()

    def forward(self, x):
        return self.inner(x)


def test_a_bound_the_user_registered_is_not_replaced(registry):
    """convert registers a traced bound only for a container that lipnet.certify refuses for
    itself: one whose registered bound refuses a child (``UnknownModuleError`` of the child) keeps
    the user's bound, and the report lists no registration."""
    from lipnet.certify import lipschitz_bound, register_lipschitz_bound

    def users_bound(module, shape):
        return lipschitz_bound(module.inner, shape)

    register_lipschitz_bound(Wrapper, users_bound)
    _, report = convert(nn.Sequential(nn.Linear(4, 4), Wrapper()), input_shape=(4,))
    assert report.registered == [] and registry[Wrapper] is users_bound
    assert not report.certifiable and "Unknown" in report.bound_error


class SelfAttention(nn.TransformerEncoderLayer):
    """An attention layer whose own forward torch.fx can trace: ``x + attention(x, x, x)``."""

    def forward(self, x):
        return x + self.self_attn(x, x, x, need_weights=False)[0]


def test_no_traced_bound_is_registered_for_attention(registry):
    """Attention is not Lipschitz: convert reports it as a blocking obstacle and registers no
    traced bound for it, even where its forward traces (torch's own attention layers do not)."""
    torch.manual_seed(0)
    layer = SelfAttention(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    _, report = convert(layer, input_shape=(3, 8), certify=False)
    assert report.registered == [] and SelfAttention not in registry
    (found,) = [o for o in report.obstacles if o.path == ""]
    assert found.blocking and "attention is not Lipschitz" in found.problem


# ----------------------------------------------------------------------------- the forward pass of input_shape


def test_the_train_and_eval_modes_are_kept_through_the_shape_pass():
    """convert runs its shape pass in eval mode; afterwards each module is back in its own mode,
    and the new layers take the mode of the layers they replace."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(), nn.Flatten(), nn.Linear(64, 2))
    net.train()
    net[4].eval()
    converted, report = convert(net, input_shape=(3, 4, 4), certify=False)
    assert [m.training for m in converted] == [True, True, True, True, False]
    assert [m.training for m in net] == [True, True, True, True, False]
    (dropout,) = report.obstacles  # random in train mode
    assert dropout.path == "2" and not dropout.blocking and "eval" in dropout.fix


def test_a_relu_called_on_an_odd_channel_count_at_its_second_call_is_kept():
    """A ReLU shared between a 4-channel and a 3-channel input: every call's shape is checked, so
    it stays a ReLU (a MaxMin would raise on the 3 channels)."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(2, 4, 1), relu, nn.Conv2d(4, 3, 1), relu)
    converted, report = convert(net, input_shape=(2, 3, 3))
    assert converted[1] is converted[3] and type(converted[1]) is nn.ReLU
    assert any("ReLU at '1' kept" in note and "3, 4 channel(s)" in note for note in report.notes)
    assert converted(torch.randn(2, 2, 3, 3)).shape == (2, 3, 3, 3)


def test_the_projections_inside_attention_are_left_without_a_note():
    """nn.MultiheadAttention reads its projections' weights directly: convert does not visit them,
    so no note calls its out_proj an unconverted subclass of nn.Linear."""
    converted, report = convert(nn.MultiheadAttention(8, 2, batch_first=True))
    assert type(converted.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert report.changes == [] and not any("out_proj" in note for note in report.notes)


# ----------------------------------------------------------------------------- what the report lists


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def test_the_children_of_a_replaced_module_are_left_to_the_replacement():
    """``replace`` swaps a whole container: its old children are neither converted nor listed."""
    net = nn.Sequential(Block(), nn.Conv2d(2, 2, 1))
    converted, report = convert(net, replace={Block: lambda m: nn.Identity()})
    assert type(converted[0]) is nn.Identity and type(converted[1]) is GramConv2d
    assert [c.path for c in report.changes] == ["0", "1"]


def test_a_shared_layer_is_listed_at_each_of_its_paths():
    """report.changes lists each replacement where it is: a conv used twice is listed twice."""
    conv = nn.Conv2d(2, 2, 1)
    converted, report = convert(nn.Sequential(conv, nn.ReLU(), conv))
    assert converted[0] is converted[2]
    assert [(c.path, c.new.split("(")[0]) for c in report.changes] == [
        ("0", "GramConv2d"), ("1", "MaxMin"), ("2", "GramConv2d")]


class FourReLUs(nn.Module):
    """ReLUs whose input layout convert cannot know without an input shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def test_the_note_on_relus_of_unknown_layout_names_three_and_counts_the_rest():
    """Four ReLUs replaced by MaxMin(dim=1): the note names the first three and counts one more."""
    _, report = convert(FourReLUs())
    (note,) = [n for n in report.notes if "replaced by MaxMin(dim=1)" in n]
    assert note.startswith("ReLU at 'a', 'b', 'c' and 1 more replaced by MaxMin(dim=1)")


# ----------------------------------------------------------------------------- which modules are swapped


def test_replace_applies_to_subclasses_of_the_type_given():
    """``replace={type: fn}`` swaps the type and its subclasses: a base class catches them all."""
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (4, 1)), nn.BatchNorm1d(4))
    converted, report = convert(net, replace={nn.modules.batchnorm._BatchNorm: lambda m: nn.Identity()})
    assert [type(m) for m in converted] == [GramLinear, nn.Identity, nn.Unflatten, nn.Identity]
    assert [c.path for c in report.changes] == ["0", "1", "3"]


def test_lipnet_layers_are_left_without_a_note():
    """A Gram layer is an nn.Linear / nn.Conv2d subclass, but already what convert makes: it is
    neither swapped nor noted as an unconverted subclass, nor reported."""
    net = nn.Sequential(GramConv2d(2, 2, 3, padding=1), nn.Flatten(), GramLinear(2 * 3 * 3, 2), nn.Linear(2, 2))
    converted, report = convert(net, input_shape=(2, 3, 3))
    assert converted[0] is not net[0] and type(converted[0]) is GramConv2d  # a copy, unchanged
    assert [c.path for c in report.changes] == ["3"]
    assert not any("not converted" in note for note in report.notes) and report.obstacles == []


def test_a_layer_its_gram_layer_refuses_is_noted_and_left():
    """A layer whose settings the Gram layer refuses (a transposed convolution set to reflect
    padding) is left as it is, with the Gram layer's reason in a note and a blocking obstacle:
    convert does not fail on it."""
    layer = nn.ConvTranspose2d(2, 2, 3)
    layer.padding_mode = "reflect"
    converted, report = convert(nn.Sequential(layer, nn.Conv2d(2, 2, 1)))
    assert type(converted[0]) is nn.ConvTranspose2d and type(converted[1]) is GramConv2d
    assert any(note.startswith("ConvTranspose2d at '0' not converted: ") and "padding mode" in note
               for note in report.notes)
    (found,) = report.obstacles
    assert found.path == "0" and found.blocking and "unnormalized linear layer" in found.problem


@pytest.mark.parametrize("hook", ["forward pre-hook", "full backward hook"])
def test_a_layer_with_any_hook_is_left_and_noted(hook):
    """A hook of any kind would be lost with the layer: the layer is left, with a note."""
    layer = nn.Linear(4, 4)
    if hook == "forward pre-hook":
        layer.register_forward_pre_hook(lambda module, args: None)
    else:
        layer.register_full_backward_hook(lambda module, grad_input, grad_output: None)
    converted, report = convert(nn.Sequential(layer, nn.Linear(4, 4)))
    assert type(converted[0]) is nn.Linear and type(converted[1]) is GramLinear
    assert any(note.startswith("Linear at '0' not converted: it has hooks") for note in report.notes)


def test_a_layer_on_the_meta_device_is_left_and_noted():
    """A layer without values (meta device) cannot be normalized: it is left, with a note."""
    converted, report = convert(nn.Sequential(nn.Linear(4, 4, device="meta")))
    assert type(converted[0]) is nn.Linear
    assert "Linear at '0' not converted: its weight is on the meta device (materialize the model first)" in (
        report.notes)


class DoubledReLU(nn.ReLU):
    """A ReLU subclass with its own forward: 2 relu(x), not 1-Lipschitz."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_relu_subclass_is_not_swapped_for_maxmin():
    """Only modules of exactly type nn.ReLU become MaxMin: a subclass may compute something else."""
    converted, report = convert(nn.Sequential(nn.Linear(4, 4), DoubledReLU()), input_shape=(4,))
    assert type(converted[1]) is DoubledReLU and [c.path for c in report.changes] == ["0"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted[1](x), 2 * torch.relu(x))


class UnusedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.relu = nn.ReLU()  # never called

    def forward(self, x):
        return self.linear(x)


def test_a_relu_the_forward_never_calls_is_kept_with_a_note():
    """With an input shape, a ReLU that the forward pass does not reach has no channel count to
    check: it is kept, and the report says why."""
    converted, report = convert(UnusedReLU(), input_shape=(4,))
    assert type(converted.relu) is nn.ReLU and type(converted.linear) is GramLinear
    assert "ReLU at 'relu' kept: it is not called on inputs of the given shape" in report.notes


# ----------------------------------------------------------------------------- the channel dimension of MaxMin


@pytest.mark.parametrize("make, dim", [
    pytest.param(lambda: nn.ConvTranspose2d(2, 4, 1), -3, id="ConvTranspose2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)), -3, id="BatchNorm2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.MaxPool2d(1)), -3, id="MaxPool2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.AvgPool2d(1)), -3, id="AvgPool2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.Dropout2d()), -3, id="Dropout2d"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(2, 4, 1), nn.MaxPool1d(1)), -2, id="MaxPool1d"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(2, 4, 1), nn.AvgPool1d(1)), -2, id="AvgPool1d"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(2, 4, 1), nn.Dropout1d()), -2, id="Dropout1d"),
    pytest.param(lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout()), -1, id="Dropout"),
])
def test_the_layout_after_each_known_layer_gives_maxmin_its_channels(make, dim):
    """Without an input shape the channel dimension of a ReLU's input is read from the layers
    before it in an nn.Sequential: after each layer of known layout, the MaxMin pairs the 4
    channels of what it receives, with and without a batch dimension alike."""
    torch.manual_seed(0)
    converted, report = convert(nn.Sequential(make(), nn.ReLU()))
    maxmin = converted[1]
    assert maxmin.dim == dim and not any("MaxMin(dim=1)" in note for note in report.notes)
    h = torch.randn((4, 3, 3)[:-dim])  # one input of the ReLU: (C, H, W), (C, L) or (C,), with C = 4
    torch.testing.assert_close(maxmin(h), maxmin(h[None])[0])
    torch.testing.assert_close(maxmin(h).sum(dim), h.sum(dim))  # it sorts pairs of channels


class FlattensFirst(nn.Sequential):
    """An nn.Sequential whose own forward flattens the convolution's output before the ReLU."""

    def forward(self, x):
        return self[1](self[0](x).flatten(1))


class Unsqueezes(nn.Module):
    """A container that gives its ReLU features as (N, C, 1): the channels are dim -2, not -1."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x.unsqueeze(-1))


@pytest.mark.parametrize("make, shape, dim", [
    pytest.param(lambda: FlattensFirst(nn.Conv2d(2, 2, 1), nn.ReLU()), (2, 2, 2), -1, id="Sequential subclass"),
    pytest.param(lambda: nn.Sequential(nn.Linear(3, 4), Unsqueezes()), (3,), -2, id="child of a container"),
])
def test_the_layout_is_not_read_across_a_forward_of_its_own(make, shape, dim):
    """The layers before a ReLU tell its layout only in an nn.Sequential that runs nn.Sequential's
    forward: elsewhere the rank of what the ReLU receives decides (``input_shape``), and the
    converted model computes what it did with a MaxMin on the channels."""
    torch.manual_seed(0)
    converted, report = convert(make(), input_shape=shape)
    (maxmin,) = [m for m in converted.modules() if type(m).__name__ == "MaxMin"]
    assert maxmin.dim == dim
    converted(torch.randn(2, *shape))


def test_a_relu_after_layers_of_different_layouts_pairs_dim_1_of_a_batch():
    """One ReLU after a convolution and after a linear layer has no single layout: it pairs dim 1,
    the channels of both batches, and the report says so."""
    torch.manual_seed(0)
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(2, 4, 1), relu, nn.Flatten(), nn.Linear(4 * 3 * 3, 4), relu)
    converted, report = convert(net, input_shape=(2, 3, 3))
    assert type(converted[1]) is type(converted[4]) and converted[1].dim == 1
    assert any("ReLU at '1' replaced by MaxMin(dim=1)" in note for note in report.notes)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        hidden = converted[0](x)
        torch.testing.assert_close(converted[1](hidden), torch.cat([torch.maximum(hidden[:, :2], hidden[:, 2:]),
                                                                    torch.minimum(hidden[:, :2], hidden[:, 2:])], 1))


# ----------------------------------------------------------------------------- the obstacles


def test_the_modules_inside_attention_are_not_reported_on_their_own():
    """Attention is reported as a whole (its projections are read directly, not called as layers):
    one obstacle, at the attention module."""
    net = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    _, report = convert(net)
    assert [(o.path, o.module, o.blocking) for o in report.obstacles] == [
        ("1", "torch.nn.MultiheadAttention", True)]


class Switch(nn.Module):
    """A container torch.fx cannot trace (Python control flow on a tensor), with its own bound."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.numel() > 0:
            return self.linear(x)
        return x

    def lipschitz_bound(self):
        return self.linear.lipschitz_bound()


def test_a_container_with_its_own_bound_is_not_traced():
    """lipnet.certify uses a container's own ``lipschitz_bound`` method: convert neither traces
    its forward nor reports it as untraceable."""
    torch.manual_seed(0)
    converted, report = convert(nn.Sequential(Switch()), input_shape=(4,))
    assert type(converted[0].linear) is GramLinear
    assert not any(o.blocking or "torch.fx" in o.problem for o in report.obstacles)
    assert report.registered == [] and report.lipschitz_bound <= 1 + 1e-5


def test_a_gram_sequential_is_no_obstacle():
    """GramSequential (an nn.Sequential subclass with its own forward) is a container lipnet.certify
    knows: no obstacle, no traced bound."""
    from lipnet.nn import GramSequential, MaxMin

    net = GramSequential(GramLinear(4, 4), MaxMin(), GramLinear(4, 2))
    _, report = convert(net, input_shape=(4,))
    assert report.obstacles == [] and report.registered == [] and report.lipschitz_bound <= 1 + 1e-5


class Stack(nn.Module):
    """Layers kept in an nn.ModuleList, which has no forward of its own."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class PlusOne(nn.Module):
    """``linear(x) + 1``: a sum with one branch computed from the input, a translation."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + 1.0


class UnusedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)  # never called

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("make", [Stack, PlusOne, UnusedNorm])
def test_containers_that_compose_1_lipschitz_layers_are_no_obstacle(registry, make):
    """A container running its children one after the other (an nn.ModuleList in a loop), adding a
    constant, or holding a module its forward never calls is 1-Lipschitz once converted: no
    obstacle, and a certified bound of at most 1."""
    _, report = convert(nn.Sequential(make()), input_shape=(4,))
    assert report.obstacles == [] and report.lipschitz_bound <= 1 + 1e-5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.linear(x)


def test_a_residual_sum_is_counted_once(registry):
    """``x + f(x)``: one pair of branches, reported with the forward's own bound 2."""
    _, report = convert(nn.Sequential(Residual()), input_shape=(4,))
    (found,) = report.obstacles
    assert found.path == "0" and not found.blocking
    assert found.problem.startswith("adds 1 pair(s) of branches computed from its input")
    assert found.problem.endswith("its forward's bound with 1-Lipschitz children is 2")


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.linear(x))


def test_a_container_in_train_mode_is_analysed_in_eval_mode_and_left_in_train_mode(registry):
    """A container's own forward is bounded in eval mode (a dropout child in train mode would make
    its graph and forward differ), and every module is back in train mode afterwards; only the
    dropout, random in train mode, is reported."""
    converted, report = convert(Dropped().train(), input_shape=(4,), certify=False)
    assert converted.training and converted.drop.training and converted.linear.training
    assert [(o.path, o.blocking) for o in report.obstacles] == [("drop", False)]


@pytest.mark.parametrize("dropout", [nn.Dropout2d(), nn.AlphaDropout(), nn.FeatureAlphaDropout()],
                         ids=["Dropout2d", "AlphaDropout", "FeatureAlphaDropout"])
def test_every_dropout_in_train_mode_is_reported(dropout):
    """Every dropout type is random in train mode (certificates are for eval mode): reported, not
    blocking; in eval mode it is the identity and no obstacle."""
    net = nn.Sequential(nn.Conv2d(2, 4, 1), dropout)
    _, report = convert(net.train(), input_shape=(2, 3, 3), certify=False)
    assert [(o.path, o.blocking) for o in report.obstacles] == [("1", False)]
    assert "eval" in report.obstacles[0].fix
    _, report = convert(net.eval(), input_shape=(2, 3, 3), certify=False)
    assert report.obstacles == []


def test_a_leaky_relu_steeper_than_1_is_reported_with_its_slope():
    """LeakyReLU(10) has slope 10 below zero: a non-blocking obstacle with bound 10."""
    _, report = convert(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(10.0)), input_shape=(4,))
    (found,) = report.obstacles
    assert found.path == "1" and not found.blocking and "Lipschitz bound 10, not 1" in found.problem
    assert report.lipschitz_bound == pytest.approx(10, rel=1e-4)


# ----------------------------------------------------------------------------- the text of the report


def test_the_report_text_groups_the_obstacles_and_tags_them():
    """The text of the report: the count of obstacles, six paths per group and how many more, the
    tags ``[bound > 1]`` and ``[no bound]``, ``<model>`` for the model itself, and no ``fix`` line
    where lipnet has none."""
    net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(4, 4), nn.GELU())], nn.Conv3d(1, 1, 1))
    _, report = convert(net)
    text = str(report)
    assert "9 module(s) keep the model from being certifiably 1-Lipschitz:" in text
    assert "  [bound > 1] torch.nn.GELU at 1, 3, 5, 7, 9, 11 and 2 more: an activation that is not 1-Lipschitz: " \
           "Lipschitz bound 1.129, not 1\n" in text
    assert "  [no bound] torch.nn.Conv3d at 16: a linear layer that lipnet has no Gram normalization for" in text
    assert "fix: None" not in text and text.count("      fix: ") == 1
    _, report = convert(nn.MaxPool2d(3, 1, 1), input_shape=(1, 4, 4))
    assert "  [bound > 1] torch.nn.MaxPool2d at <model>: " in str(report)


def test_the_report_text_names_the_registered_types(registry):
    """The text of the report lists the container types convert registered a traced bound for."""
    _, report = convert(nn.Sequential(Residual()), input_shape=(4,))
    assert report.registered == [f"{__name__}.Residual"]
    assert f"Registered lipnet.convert.traced_lipschitz_bound for: {__name__}.Residual" in str(report)


class Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return 0.0 * self.linear(x)


def test_a_model_with_bound_zero_is_certifiable(registry):
    """A certified bound of 0 (a constant function) is a bound: the report calls it certifiable."""
    _, report = convert(nn.Sequential(Zero()), input_shape=(4,))
    assert report.lipschitz_bound == 0.0 and report.certifiable


# ----------------------------------------------------------------------------- found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_container_bounded_by_a_gram_layer_is_not_reported_as_bound_1_not_1(dtype):
    """A container whose own ``lipschitz_bound`` is that of its GramLinear got the obstacle
    "Lipschitz bound 1, not 1" for some weights (seed 0), and none for others (seed 1)."""
    torch.manual_seed(0)
    _, report = convert(nn.Sequential(Switch()).to(dtype), input_shape=(4,))
    assert not any("not 1" in o.problem for o in report.obstacles), report.obstacles


class TimesFactor(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.relu, self.factor = nn.ReLU(), factor

    def forward(self, x):
        return self.relu(x) * self.factor


@pytest.mark.parametrize("factor, printed", [(1.00005, None), (1.0002, "1.0002"), (1.5, "1.5")])
def test_a_bound_slightly_above_1_is_printed_with_the_digits_that_show_it(factor, printed):
    """Bounds up to 1 + 1e-4 count as 1 (a Gram layer's rounding margin); above, the report prints
    enough digits to tell the bound from 1."""
    _, report = convert(nn.Sequential(TimesFactor(factor)), input_shape=(4,))
    problems = [o.problem for o in report.obstacles]
    if printed is None:
        assert problems == []
    else:
        assert len(problems) == 1 and f"Lipschitz bound {printed} with 1-Lipschitz children, not 1" in problems[0]


def test_a_module_called_at_two_shapes_is_bounded_at_both():
    """A shared adaptive pooling that downsamples 8x8 to 4x4 (bound 1/2) and upsamples 2x2 to 4x4
    (each input copied 4 times: bound 2): the obstacle gives the larger bound."""
    pool = nn.AdaptiveAvgPool2d(4)
    net = nn.Sequential(pool, nn.AvgPool2d(2), pool)
    _, report = convert(net, input_shape=(1, 8, 8))
    (found,) = report.obstacles
    assert found.path == "0" and not found.blocking and "Lipschitz bound 2, not 1" in found.problem
