"""Residual blocks: the identity kernel, exact norms of the applied operator, the convex block."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipnet.bounds import exact_conv2d_spectral_norm
from lipnet.nn import ConvexResidual, GramConv2d, GramResidualConv2d
from lipnet.nn.residual import identity_kernel


@pytest.mark.parametrize("kernel_size", [1, 3, 2, (3, 4), 5])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect"])
def test_identity_kernel_is_the_identity(kernel_size, groups, padding_mode):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    conv = nn.Conv2d(4, 4, kernel_size, padding="same", groups=groups, bias=False, padding_mode=padding_mode)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.copy_(identity_kernel(4, kernel_size, groups, dtype=torch.float64))
    torch.testing.assert_close(conv(x), x, rtol=0, atol=0)


BLOCKS = [
    dict(channels=4, kernel_size=3),
    dict(channels=4, kernel_size=2, bias=False),
    dict(channels=4, kernel_size=3, groups=2, padding_mode="circular"),
    dict(channels=2, kernel_size=(3, 1), padding_mode="reflect"),
]


@pytest.mark.parametrize("cfg", BLOCKS)
def test_forward_is_x_plus_conv_over_the_bound(cfg):
    block = GramResidualConv2d(**cfg).double()
    x = torch.randn(3, cfg["channels"], 6, 5, dtype=torch.float64)
    plain = nn.Conv2d(cfg["channels"], cfg["channels"], cfg["kernel_size"], padding="same", bias=False,
                      groups=cfg.get("groups", 1), padding_mode=cfg.get("padding_mode", "zeros")).double()
    with torch.no_grad():
        plain.weight.copy_(block.weight)
    scale = block.weight_norm_bound((6, 5))
    bias = 0 if block.bias is None else block.bias[None, :, None, None]
    torch.testing.assert_close(block(x), (x + plain(x)) / scale + bias)


@pytest.mark.parametrize("cfg", BLOCKS)
@pytest.mark.parametrize("size", [(5, 5), (6, 4)])
def test_applied_operator_norm_at_most_certified_bound(cfg, size):
    block = GramResidualConv2d(**cfg).double()
    weight = block.normalized_weight(size)
    exact = exact_conv2d_spectral_norm(weight, size, padding="same", groups=cfg.get("groups", 1),
                                       padding_mode=cfg.get("padding_mode", "zeros"))
    assert exact <= 1 + 1e-12
    assert exact <= block.lipschitz_bound(size) <= 1 + 1e-5


def test_bound_includes_the_identity_without_triangle_slack():
    block = GramResidualConv2d(3, 3, bias=False).double()
    with torch.no_grad():
        block.weight.copy_(-0.5 * identity_kernel(3, 3, dtype=torch.float64))
    # I + K = I / 2: a triangle-inequality bound would give 1.5 (the Gram bound of the
    # screened frequencies is within 3^(1/64) of the exact 0.5).
    bound = block.weight_norm_bound((8, 8)).item()
    assert 0.5 <= bound <= 0.5 * 3 ** (1 / 64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), x * (0.5 / bound))


def test_state_dict_holds_the_plain_branch_kernel():
    block = GramResidualConv2d(4, 3)
    plain = nn.Conv2d(4, 4, 3, padding="same")
    assert isinstance(block, GramConv2d)
    assert list(block.state_dict()) == list(plain.state_dict())
    block.load_state_dict(plain.state_dict())
    torch.testing.assert_close(block.weight, plain.weight)


def test_training_keeps_the_block_one_lipschitz_and_eval_caches():
    block = GramResidualConv2d(4, 3)
    opt = torch.optim.Adam(block.parameters(), lr=5e-2)
    x, target = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    for _ in range(5):
        loss = F.mse_loss(block(x), 3 * target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    exact = exact_conv2d_spectral_norm(block.normalized_weight((6, 6)), 6, padding="same")
    assert exact <= block.lipschitz_bound((6, 6)) <= 1 + 1e-5
    block.eval()
    with torch.no_grad():
        first = block(x)
        assert block._eval_cache
        torch.testing.assert_close(block(x), first)


def test_convex_residual_forward_and_coefficients():
    branch = nn.Sequential(GramConv2d(4, 4, 3, padding=1), nn.ReLU())
    block = ConvexResidual(branch, alpha=0.25)
    x = torch.randn(2, 4, 5, 5)
    keep, alpha = block.coefficients()
    assert alpha.item() == pytest.approx(0.25) and (keep + alpha).item() == pytest.approx(1.0)
    torch.testing.assert_close(block(x), 0.75 * x + 0.25 * branch(x))
    assert isinstance(block.alpha_logit, nn.Parameter)
    fixed = ConvexResidual(branch, alpha=0.5, learnable=False)
    assert "alpha_logit" in dict(fixed.named_buffers())


def test_convex_residual_alpha_reads_and_sets_the_logit_the_forward_and_bound_use():
    """``block.alpha = 0.9`` once made a plain attribute that neither the forward nor the bound read."""
    from lipnet.certify import lipschitz_bound

    branch = nn.Sequential(GramConv2d(2, 2, 3, padding=1, dtype=torch.float64))
    block = ConvexResidual(branch, alpha=0.25, dtype=torch.float64)
    assert block.alpha == pytest.approx(0.25)
    logit = block.alpha_logit
    block.alpha = 0.9
    assert block.alpha_logit is logit and block.alpha == pytest.approx(0.9)  # in place: an optimizer keeps it
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), 0.1 * x + 0.9 * branch(x))
    with torch.no_grad():
        branch[0].weight.mul_(3)  # still normalized: the bound reads the new alpha either way
    assert lipschitz_bound(nn.Sequential(block), (2, 5, 5)) <= 1 + 1e-5
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="strictly between"):
            block.alpha = bad
    assert block.alpha == pytest.approx(0.9)


def test_convex_residual_takes_its_branchs_dtype_and_certifies_in_float64():
    """A float64 network whose first parameter is the mixing logit: the certification's dry run
    takes that parameter's dtype, which used to be float32 and crash the float64 convolution."""
    from lipnet.certify import lipschitz_bound

    block = ConvexResidual(nn.Sequential(GramConv2d(2, 2, 3, padding=1, dtype=torch.float64), nn.ReLU()), alpha=0.3)
    assert block.alpha_logit.dtype == torch.float64
    assert ConvexResidual(nn.ReLU()).alpha_logit.dtype == torch.get_default_dtype()
    assert ConvexResidual(nn.ReLU(), dtype=torch.float64).alpha_logit.dtype == torch.float64
    bound = lipschitz_bound(nn.Sequential(block), (2, 5, 5))
    assert 0.9 <= bound <= 1 + 1e-5  # a 1-Lipschitz branch mixed with the identity


def test_convex_residual_rejects_bad_input():
    with pytest.raises(ValueError, match="strictly between"):
        ConvexResidual(nn.Identity(), alpha=1.0)
    with pytest.raises(ValueError, match="preserve the shape"):
        ConvexResidual(nn.Conv2d(2, 3, 1))(torch.randn(1, 2, 3, 3))
    # A plain function crashed with "'function' object has no attribute 'parameters'".
    with pytest.raises(TypeError, match="branch must be an nn.Module"):
        ConvexResidual(torch.tanh)


def test_identity_kernel_rejects_bad_groups():
    with pytest.raises(ValueError, match="divisible"):
        identity_kernel(3, 3, groups=2)


def test_repr_neither_warns_nor_raises():
    """``repr`` of a block with a learnable alpha read it without detaching (a UserWarning about a tensor
    that requires grad), and one whose alpha_logit holds several numbers raised in ``repr``."""
    import warnings

    block = ConvexResidual(nn.Sequential(GramConv2d(2, 2, 3, padding=1)), alpha=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "alpha=0.25" in repr(block)
    block.alpha_logit = nn.Parameter(torch.zeros(2))
    assert "alpha_logit of shape (2,)" in repr(block)
