"""Networks made of Gram layers: empirical Lipschitz constant and torch.compile."""

import warnings

import pytest
import torch
from torch import nn

from lipnet.nn import GramConv2d, GramLinear, MaxMin


def small_net():
    return nn.Sequential(
        GramConv2d(3, 8, 3, padding=1),
        MaxMin(),
        GramConv2d(8, 16, 3, stride=2, padding=1),
        MaxMin(),
        GramConv2d(16, 16, 3, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.Flatten(),
        GramLinear(16 * 4 * 4, 10),
    )


def test_empirical_lipschitz_constant_at_most_one():
    torch.manual_seed(0)
    net = small_net().double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    # Largest gradient norm of random projections of the output (the Jacobian norm).
    worst = 0.0
    for _ in range(8):
        u = torch.randn(64, 10, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad((net(x) * u).sum(), x)
        worst = max(worst, grad.flatten(1).norm(dim=1).max().item())
    assert worst <= 1 + 1e-9
    # Pairs of nearby and far inputs, after a few steps of ascent on the ratio.
    a = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).requires_grad_()
    opt = torch.optim.Adam([b], lr=1e-2)
    for _ in range(30):
        ratio = (net(a) - net(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    with torch.no_grad():
        ratio = (net(a) - net(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max().item() <= 1 + 1e-9


def test_training_steps_keep_the_network_one_lipschitz():
    torch.manual_seed(1)
    net = small_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bound = 1.0
    for layer, size in [(net[0], (8, 8)), (net[2], (8, 8)), (net[4], (4, 4)), (net[7], None)]:
        bound *= layer.lipschitz_bound(size) if size else layer.lipschitz_bound()
    assert bound <= 1 + 1e-5


@pytest.mark.slow
def test_torch_compile_runs_and_matches_eager():
    torch.manual_seed(0)
    net = small_net()
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(net)
    out = compiled(x)
    torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_a_gram_network_traces_as_one_graph():
    """No graph breaks and no host synchronizations in the bounds: a compiled step is one graph."""
    import torch._dynamo

    from lipnet.models import build_model

    torch._dynamo.reset()
    model = build_model("liresnet-xs", in_channels=3, num_classes=10, input_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(model)(torch.rand(2, 3, 16, 16))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    # The embeddings' cache is bypassed while compiling: no "ignores the cache wrapper" warning.
    assert not [w for w in caught if "lru_cache" in str(w.message)]
