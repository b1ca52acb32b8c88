"""Helper 75's adversarial review of commits 788ba4a..1c867cf: in-place compilation in as_compiled,
complex plain last Linear, certified_accuracy's data forms, one check_input_shape, Gram layers under
FakeTensorMode, and the DataParallel/DDP/AveragedModel subclass rules of wrapped_module.

The bugs it found are fixed and tested here (each failed before its fix), beside cheap regression tests of what held.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lipnet.bounds.gram import refine_exceeding
from lipnet.certify import LipschitzBoundError, certified_accuracy, lipschitz_bound
from lipnet.certify.lipschitz import check_input_shape, plain_linear_lipschitz_bound
from lipnet.models.wrappers import wrapped_module
from lipnet.nn import GramConv2d, GramLinear


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ones_gram_linear():
    """A bfloat16 GramLinear whose normalized weight 1/3 rounds up in bfloat16 to 0.333984375: the
    rounded quotient has norm 1.00195, and only the eager forward's check rescales it."""
    layer = GramLinear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    return layer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), GramLinear(6, 3)).eval()


def _xy():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


class _Examples(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ---------------------------------------------------------------------------------------------
# Bugs found
# ---------------------------------------------------------------------------------------------

def test_wrapper_compiled_in_place_is_certified_as_compiled(fresh_dynamo):
    model = nn.Sequential(_ones_gram_linear(), nn.Identity()).to(torch.bfloat16).eval()
    ema = AveragedModel(model)
    ema.compile(backend="eager")
    x = torch.ones(1, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        slope = float(ema(x).double().norm() / x.double().norm())  # f(0) = 0: no bias
    assert slope > 0.999  # the compiled forward ran
    try:
        bound = lipschitz_bound(ema, (3,))
    except LipschitzBoundError:
        return
    assert bound >= slope


def test_as_compiled_turns_refinement_off_for_a_wrapper_compiled_in_place():
    from lipnet.bounds.gram import refines_exceeding
    from lipnet.certify.lipschitz import as_compiled

    ema = AveragedModel(_net())
    ema.compile()  # lazy: nothing is compiled until it is called
    with as_compiled(ema):
        assert not refines_exceeding(torch.device("cpu"))


class _SlicedBatches(Dataset):
    """A map-style Dataset of whole (x, y) batches whose __getitem__ slices, as many do: past its
    __len__ it returns empty batches instead of raising IndexError (a DataLoader's sampler reads
    only range(len)). Past len + 2 it raises, so that the test fails instead of hanging."""

    def __init__(self, x, y, bs):
        self.x, self.y, self.bs = x, y, bs

    def __len__(self):
        return -(-len(self.x) // self.bs)

    def __getitem__(self, i):
        if i >= len(self) + 2:
            raise RuntimeError(f"item {i} read of a Dataset of {len(self)} items: iterated past its __len__")
        return self.x[i * self.bs:(i + 1) * self.bs], self.y[i * self.bs:(i + 1) * self.bs]


def test_dataset_of_batches_is_read_up_to_its_length():
    x, y = _xy()
    result = certified_accuracy(_net(), _SlicedBatches(x, y, 3), eps=[0.01], progress=False)
    assert result.n == 8


def test_fake_model_runs_twice_in_eval_mode():
    with FakeTensorMode(), torch.no_grad():
        net = nn.Sequential(GramConv2d(3, 4, 3, padding=1), nn.Flatten(), GramLinear(4 * 8 * 8, 5)).eval()
        x = torch.rand(2, 3, 8, 8)
        assert net(x).shape == (2, 5)
        assert net(x).shape == (2, 5)


def test_fake_pass_and_real_forward_share_no_cache_entries():
    net = nn.Sequential(GramConv2d(3, 4, 3, padding=1), nn.Flatten(), GramLinear(4 * 8 * 8, 5)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad(), refine_exceeding(False):
        before = net(x)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert net(mode.from_tensor(x)).shape == (2, 5)
        after = net(x)
    assert type(after) is torch.Tensor
    assert torch.equal(before, after)


def _ddp_like(cls, module):
    """A DistributedDataParallel (subclass) instance holding ``module``, without a process group
    (wrapped_module reads its class and ``module`` alone; DDP's forward is not run)."""
    wrapper = cls.__new__(cls)
    nn.Module.__init__(wrapper)
    wrapper.module = module
    return wrapper


class _AttrForwardingDDP(DistributedDataParallel):
    """The common DDP subclass that forwards unknown attributes to the model (model.num_classes, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def test_ddp_subclass_forwarding_attributes_is_still_a_wrapper():
    net = _net()
    assert wrapped_module(_ddp_like(_AttrForwardingDDP, net)) is net
    assert lipschitz_bound(_ddp_like(_AttrForwardingDDP, net), (6,)) == lipschitz_bound(net, (6,))


class _NumpyLabels(_Examples):
    """Examples whose labels are 0-dim numpy arrays (np.array(k), as a .squeeze() of a label row gives)."""

    def __getitem__(self, i):
        return self.x[i].numpy(), np.array(int(self.y[i]))


def test_dataset_with_zero_dim_numpy_labels_is_read_as_examples():
    x, y = _xy()
    reference = certified_accuracy(_net(), (x, y), eps=[0.01], progress=False)
    result = certified_accuracy(_net(), _NumpyLabels(x, y), eps=[0.01], batch_size=3, progress=False)
    assert result.n == 8
    assert torch.equal(result.radii, reference.radii)


def test_check_input_shape_refuses_torch_bools():
    with pytest.raises(ValueError):
        check_input_shape((torch.tensor(True), 4))


def test_dataparallel_with_instance_gather_is_not_a_wrapper():
    dp = nn.DataParallel(_net())
    original = dp.gather
    dp.gather = lambda outputs, device: 2 * original(outputs, device)
    assert wrapped_module(dp) is None


# ---------------------------------------------------------------------------------------------
# What held (regression tests)
# ---------------------------------------------------------------------------------------------

def test_held_fake_pass_does_not_change_real_forward_or_bound_on_cpu():
    net = nn.Sequential(GramConv2d(3, 4, 3, padding=1), nn.Flatten(), GramLinear(4 * 8 * 8, 5)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before, bound = net(x), lipschitz_bound(net, (3, 8, 8))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert net(mode.from_tensor(x)).shape == (2, 5)
        assert torch.equal(net(x), before)
    assert lipschitz_bound(net, (3, 8, 8)) == bound


def test_held_submodule_compiled_in_place_is_refused():
    net = _net()
    net[1].compile()
    with pytest.raises(LipschitzBoundError, match="compiled in place"):
        lipschitz_bound(net, (6,))


def test_held_complex_plain_last_linear_is_refused():
    layer = nn.Linear(4, 3).to(torch.complex64)
    with pytest.raises(LipschitzBoundError, match="complex"):
        plain_linear_lipschitz_bound(layer)


@pytest.mark.parametrize("form", ["tensors", "numpy+list", "tensor_dataset", "examples_dataset", "generator",
                                  "loader", "mixed_first_label", "numpy_int_labels"])
def test_held_data_forms_give_the_same_radii(form):
    x, y = _xy()
    reference = certified_accuracy(_net(), (x, y), eps=[0.01], progress=False)

    class MixedFirst(_Examples):  # the first label an int, the others 0-dim tensors
        def __getitem__(self, i):
            return self.x[i], int(self.y[i]) if i == 0 else self.y[i]

    class NumpyInts(_Examples):
        def __getitem__(self, i):
            return self.x[i].numpy(), np.int64(self.y[i])

    data = {
        "tensors": lambda: (x, y),
        "numpy+list": lambda: (x.numpy(), y.tolist()),
        "tensor_dataset": lambda: TensorDataset(x, y),
        "examples_dataset": lambda: _Examples(x, y),
        "generator": lambda: ((x[i:i + 3], y[i:i + 3]) for i in range(0, 8, 3)),
        "loader": lambda: DataLoader(TensorDataset(x, y), batch_size=3),
        "mixed_first_label": lambda: MixedFirst(x, y),
        "numpy_int_labels": lambda: NumpyInts(x, y),
    }[form]()
    result = certified_accuracy(_net(), data, eps=[0.01], batch_size=3, progress=False)
    assert result.n == 8
    assert torch.equal(result.radii, reference.radii)
    assert torch.equal(result.correct, reference.correct)


def test_held_loader_with_drop_last_and_subset_read_as_given():
    x, y = _xy()
    loader = DataLoader(TensorDataset(x, y), batch_size=3, drop_last=True)
    assert certified_accuracy(_net(), loader, eps=[0.01], progress=False).n == 6
    reference = certified_accuracy(_net(), (x[[1, 4, 6]], y[[1, 4, 6]]), eps=[0.01], progress=False)
    subset = certified_accuracy(_net(), Subset(TensorDataset(x, y), [1, 4, 6]), eps=[0.01], batch_size=2,
                                progress=False)
    assert torch.equal(subset.radii, reference.radii)


def test_held_dataset_with_images_and_labels_is_read_through_its_items():
    x, y = _xy()

    class Held(_Examples):  # holds raw images, yields them flipped: what it yields is certified
        images, labels = property(lambda self: self.x), property(lambda self: self.y)

        def __getitem__(self, i):
            return self.x[i].flip(0), self.y[i]

    reference = certified_accuracy(_net(), (x.flip(1), y), eps=[0.01], progress=False)
    result = certified_accuracy(_net(), Held(x, y), eps=[0.01], batch_size=3, progress=False)
    assert torch.equal(result.radii, reference.radii)


def test_held_generator_is_consumed_once():
    x, y = _xy()
    reads = []

    def batches():
        for i in range(0, 8, 3):
            reads.append(i)
            yield x[i:i + 3], y[i:i + 3]

    assert certified_accuracy(_net(), batches(), eps=[0.01], progress=False).n == 8
    assert reads == [0, 3, 6]


@pytest.mark.parametrize("shape", [(3, 8.7), 4, (True, 2), (np.True_, 2), (0, 2), ()])
def test_held_bad_input_shapes_refused_everywhere(shape):
    import lipnet
    from lipnet.convert.traced_bound import traced_lipschitz_bound

    net = _net()
    for call in (lambda: lipschitz_bound(net, shape), lambda: traced_lipschitz_bound(net, shape),
                 lambda: lipnet.export(net, shape)):
        with pytest.raises(ValueError, match="input_shape"):
            call()


def test_held_numpy_and_torch_integers_accepted():
    assert check_input_shape((np.int64(6),)) == (6,)
    assert check_input_shape(torch.Size([1, 6])) == (1, 6)
    assert lipschitz_bound(_net(), (np.int32(6),)) == lipschitz_bound(_net(), (6,))


def test_held_wrapper_rules():
    net = _net()

    class Ema(AveragedModel):
        def update_parameters(self, model):
            super().update_parameters(model)

    class Scaled(AveragedModel):
        def forward(self, *args, **kwargs):
            return 3 * super().forward(*args, **kwargs)

    class Gathered(nn.DataParallel):
        def gather(self, outputs, output_device):
            return 2 * super().gather(outputs, output_device)

    class AttrDP(nn.DataParallel):
        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    ema = Ema(net)
    assert wrapped_module(ema) is ema.module
    assert wrapped_module(Scaled(net)) is None
    assert wrapped_module(Gathered(net)) is None
    assert wrapped_module(AttrDP(net)) is net
    assert wrapped_module(_ddp_like(DistributedDataParallel, net)) is net
    with pytest.raises(Exception):  # a scaled EMA is not bounded as its inner model
        lipschitz_bound(Scaled(copy.deepcopy(net)), (6,))
