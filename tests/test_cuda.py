"""The CUDA paths: bounds, layers, bf16 autocast, compile, data and a recipe step on a GPU.

Skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs them on the device
machine. Each test compares the GPU result with the CPU/float64 reference, so a GPU-only
soundness or correctness bug fails here.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lipnet
from lipnet.bounds import conv2d_spectral_norm, exact_conv2d_spectral_norm, matrix_spectral_norm
from lipnet.certify import certified_accuracy, lipschitz_bound
from lipnet.data import DeviceLoader, synthetic_dataset, write_npz
from lipnet.models import build_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

CONFIGS = [
    dict(padding=1),
    dict(padding=1, padding_mode="circular"),
    dict(padding=2, stride=2),
    dict(padding=0, dilation=2),
    dict(padding=1, groups=2),
]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    # TF32 would change the float32 bound's rounding; the library never enables it itself.
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def assert_gradients_agree(grad, expected):
    """Two float32 gradients of one bound computed along different paths (complex products or
    the real form and autocorrelation; eager or replayed): the gradient is the outer product of
    the top singular vectors, and float32 leaves each entry about 4e-4 of the largest away from
    the float64 gradient (measured on CPU-2 for these kernels, either path), so they agree to a
    few parts in 1e3 of the largest entry, not to float32's 1e-7."""
    torch.testing.assert_close(grad, expected, rtol=0, atol=2e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("size", [5, 8])
def test_conv_bound_on_gpu_is_above_the_exact_norm(config, size):
    gen = torch.Generator().manual_seed(size)
    for trial in range(5):
        weight = torch.randn(6, 6 // config.get("groups", 1), 3, 3, generator=gen, dtype=torch.float64)
        exact = exact_conv2d_spectral_norm(weight, (size, size), **config)
        bound64 = conv2d_spectral_norm(weight.cuda(), (size, size), **config).item()
        bound32 = conv2d_spectral_norm(weight.float().cuda(), (size, size), **config).item()
        assert bound64 >= exact * (1 - 1e-12)  # float64 rounding; the certificate adds its margin
        assert bound32 >= exact * (1 - 1e-5)


def test_matrix_bound_on_gpu_matches_cpu():
    mat = torch.randn(4, 30, 20, dtype=torch.complex128)
    cpu = matrix_spectral_norm(mat, n_iter=8)
    gpu = matrix_spectral_norm(mat.cuda(), n_iter=8).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-10, atol=0)
    assert (cpu >= torch.linalg.matrix_norm(mat, ord=2) * (1 - 1e-12)).all()


def test_real_form_gram_steps_on_gpu_match_complex_products(monkeypatch):
    """An eager GPU batch of at least EAGER_ARITHMETIC_MIN_WORK multiply-adds per step takes the
    real form: the same bound as complex products, and sound against the float64 exact norms."""
    import lipnet.bounds.gram as gram

    size = 256
    mats = torch.randn(-(-gram.EAGER_ARITHMETIC_MIN_WORK // size**3), size, size, dtype=torch.complex64,
                       device="cuda")
    assert gram.uses_real_form(mats)
    real = gram.max_gram_bound(mats, 10, 5, 2).value.item()
    monkeypatch.setattr(gram, "uses_real_form", lambda mat: False)
    complex_products = gram.max_gram_bound(mats, 10, 5, 2).value.item()
    exact = torch.linalg.matrix_norm(mats.cpu().to(torch.complex128), ord=2).max().item()
    assert real == pytest.approx(complex_products, rel=1e-5)
    assert real >= exact * (1 - 1e-5)


def test_compiled_conv_bound_takes_the_arithmetic_path_on_gpu():
    """Compiled (launches cost no host time), a GPU bound takes the autocorrelation and the
    real form, as on the CPU: it matches the eager bound (symbols, complex products) up to
    rounding and stays above the exact norm."""
    import lipnet.bounds.conv as conv
    from lipnet.bounds.circulant import distinct_frequencies
    from lipnet.bounds.conv import conv2d_embedding

    torch.manual_seed(0)
    weight = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    emb = conv2d_embedding(3, 16, padding=1)
    frequencies = len(distinct_frequencies(emb.height.fft_size, emb.width.fft_size))
    assert not conv._uses_symbol_lags(emb, weight.shape, 1, frequencies, 5, weight.device)  # eager: launches
    eager = conv2d_spectral_norm(weight, 16, padding=1)
    (eager_grad,) = torch.autograd.grad(eager, weight)
    compiled = torch.compile(lambda w: conv2d_spectral_norm(w, 16, padding=1), fullgraph=True)
    bound = compiled(weight)
    (grad,) = torch.autograd.grad(bound, weight)
    torch.testing.assert_close(bound, eager, rtol=1e-5, atol=0)
    assert_gradients_agree(grad, eager_grad)
    exact = exact_conv2d_spectral_norm(weight.detach().double().cpu(), (16, 16), padding=1)
    assert bound.item() >= exact * (1 - 1e-5)


def test_layer_train_step_and_certified_bound_on_gpu():
    torch.manual_seed(0)
    cpu = lipnet.GramConv2d(8, 8, 3, padding=1)
    gpu = lipnet.GramConv2d(8, 8, 3, padding=1).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 8, 10, 10)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-5)
    gpu(x.cuda()).square().sum().backward()
    assert torch.isfinite(gpu.weight.grad).all()
    normalized = gpu.normalized_weight((10, 10)).detach().double().cpu()
    exact = exact_conv2d_spectral_norm(normalized, (10, 10), padding=1)
    certified = gpu.lipschitz_bound((10, 10))
    assert exact <= certified
    assert abs(certified - cpu.lipschitz_bound((10, 10))) <= 1e-5
    assert certified <= 1 + 1e-5


def test_conv1d_layer_on_gpu_matches_cpu_and_bounds_the_exact_norm():
    from lipnet.bounds import exact_conv1d_spectral_norm

    torch.manual_seed(0)
    cpu = lipnet.GramConv1d(6, 8, 5, padding=2, stride=2)
    gpu = lipnet.GramConv1d(6, 8, 5, padding=2, stride=2).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 6, 21)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-5)
    gpu(x.cuda()).square().sum().backward()
    assert torch.isfinite(gpu.weight.grad).all()
    normalized = gpu.normalized_weight((21,)).detach().double().cpu()
    exact = exact_conv1d_spectral_norm(normalized, 21, padding=2, stride=2)
    certified = gpu.lipschitz_bound((21,))
    assert exact <= certified <= 1 + 1e-5


def test_conv_transpose2d_layer_on_gpu_matches_cpu_and_bounds_the_exact_norm():
    from lipnet.bounds import exact_conv_transpose2d_spectral_norm

    torch.manual_seed(0)
    cpu = lipnet.GramConvTranspose2d(6, 4, 4, stride=2, padding=1)
    gpu = lipnet.GramConvTranspose2d(6, 4, 4, stride=2, padding=1).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 6, 7, 7)
    torch.testing.assert_close(gpu(x.cuda(), output_size=[15, 15]).cpu(), cpu(x, output_size=[15, 15]),
                               rtol=1e-4, atol=1e-5)
    gpu(x.cuda()).square().sum().backward()
    assert torch.isfinite(gpu.weight.grad).all()
    normalized = gpu.normalized_weight((7, 7)).detach().double().cpu()
    exact = exact_conv_transpose2d_spectral_norm(normalized, 7, stride=2, padding=1)
    assert exact <= gpu.lipschitz_bound((7, 7)) <= 1 + 1e-5


def test_bf16_autocast_forward_is_close_to_float32():
    torch.manual_seed(0)
    model = build_model("convnet-xs", in_channels=3, num_classes=10, input_size=32).cuda()
    x = torch.rand(16, 3, 32, 32, device="cuda")
    reference = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()  # outside autocast, as the trainer does
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiled_network_matches_eager_on_gpu():
    torch.manual_seed(0)
    model = build_model("convnet-xs", in_channels=3, num_classes=10, input_size=32).cuda()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_network_bound_and_certificates_agree_with_cpu():
    torch.manual_seed(0)
    model = build_model("liresnet-xs", in_channels=3, num_classes=10, input_size=32).eval()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    cpu_bound = lipschitz_bound(model, (3, 32, 32))
    cpu = certified_accuracy(model, (x, y), eps=[36 / 255], progress=False, device="cpu")
    model.cuda()
    assert abs(lipschitz_bound(model, (3, 32, 32)) - cpu_bound) <= 1e-5 * cpu_bound
    gpu = certified_accuracy(model, (x, y), eps=[36 / 255], progress=False)
    torch.testing.assert_close(gpu.radii, cpu.radii, rtol=1e-4, atol=1e-5)


def test_data_loader_keeps_uint8_on_the_gpu_and_augments_there():
    data = synthetic_dataset("cifar10", 64, split="train")
    loader = DeviceLoader(data, 16, device="cuda", padding=4, flip=True)
    assert loader.data.images.device.type == "cuda" and loader.data.images.dtype == torch.uint8
    images, labels = next(loader.epoch(0))
    assert images.device.type == "cuda" and images.shape == (16, 3, 32, 32)
    assert 0 <= images.min() and images.max() <= 1


def test_recipe_trains_a_few_steps_on_gpu(tmp_path, capsys):
    from recipes.train import main

    data = tmp_path / "data"
    write_npz(synthetic_dataset("cifar10", 256, split="train"), data / "train.npz")
    write_npz(synthetic_dataset("cifar10", 128, split="test", seed=1), data / "test.npz")
    out = tmp_path / "run"
    assert main(["cifar10", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
                 "--model", "liresnet-xs", "--progress", "false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lipschitz"] > 0 and 0 <= report["clean_accuracy"] <= 1
    assert all(entry["lipschitz"] <= 1 + 1e-5 for entry in report["module_bounds"] if entry["normalized"])
    from lipnet.checkpoint import load_model

    assert load_model(out / "model.pt")[1]["bounds_screened_alone"] is True  # a GPU screens its bounds alone


def test_recipe_trains_with_cuda_graphs(tmp_path):
    """compile_mode='reduce-overhead': the step replays CUDA graphs and still trains and certifies."""
    from recipes.train import main

    data = tmp_path / "data"
    write_npz(synthetic_dataset("cifar10", 256, split="train"), data / "train.npz")
    write_npz(synthetic_dataset("cifar10", 128, split="test", seed=1), data / "test.npz")
    out = tmp_path / "run"
    assert main(["cifar10", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "2", "--batch-size", "64",
                 "--model", "liresnet-xs", "--compile-mode", "reduce-overhead", "--progress", "false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lipschitz"] > 0 and 0 <= report["clean_accuracy"] <= 1


def test_exactness_of_conv_bound_against_dense_operator_on_gpu():
    """The symbol route on the GPU against the explicit operator (impulse responses, float64)."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    n = 5
    basis = torch.eye(2 * n * n, dtype=torch.float64).reshape(-1, 2, n, n)
    dense = F.conv2d(basis, weight, padding=1).reshape(2 * n * n, -1)
    exact = torch.linalg.matrix_norm(dense, ord=2).item()
    assert conv2d_spectral_norm(weight.cuda(), (n, n), padding=1).item() >= exact * (1 - 1e-12)


def test_stacked_bounds_on_gpu_equal_each_layer_alone(stack_calls):
    """On CUDA a LiResNet stacks its equal residual bounds by default: same outputs and
    gradients as every layer bounding itself, eager and compiled, and each stacked kernel's
    bound is above its exact norm."""
    import copy

    from lipnet.nn import GramResidualConv2d

    torch.manual_seed(0)
    model = build_model("liresnet-xs", in_channels=3, num_classes=10, input_size=16).cuda().train()
    for module in model.modules():
        if isinstance(module, GramResidualConv2d):
            module.weight.data.normal_(0, 0.1)
    per_layer = copy.deepcopy(model)
    per_layer.stack_bounds = False
    x = torch.rand(8, 3, 16, 16, device="cuda")
    out = model(x)
    assert stack_calls == [(4, (8, 8))]
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    reference = per_layer(x)
    expected = torch.autograd.grad(reference.square().sum(), list(per_layer.parameters()))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), reference, rtol=1e-4, atol=1e-5)
    weights = torch.stack([m.weight.detach() + 0 for m in model.modules() if isinstance(m, GramResidualConv2d)])
    bounds = conv2d_spectral_norm(weights.double(), (8, 8), padding="same")
    for weight, bound in zip(weights, bounds):
        assert bound.item() >= exact_conv2d_spectral_norm(weight.double().cpu(), (8, 8), padding="same") * (1 - 1e-12)


@pytest.fixture
def _bound_graphs():
    from lipnet.bounds import graphs

    lipnet.bounds.release_cuda_graphs()
    with lipnet.bounds.cuda_graphs():
        yield graphs._GRAPHS
    lipnet.bounds.release_cuda_graphs()


def _bound_and_grad(weight, **kwargs):
    weight = weight.detach().requires_grad_()
    bound = conv2d_spectral_norm(weight, 16, padding=1, **kwargs)
    (grad,) = torch.autograd.grad((bound * torch.arange(1, bound.numel() + 1, device=bound.device)).sum(), weight)
    return bound.detach(), grad


def test_bounds_replayed_as_cuda_graphs_equal_eager(_bound_graphs):
    """lipnet.bounds.cuda_graphs: the stacked conv bound and the dense bound, replayed, equal
    the eager computation (values and gradients); one forward and one backward graph per
    configuration, recorded once; calls are independent (two forwards, then the backwards)."""
    torch.manual_seed(0)
    stack = torch.randn(3, 16, 16, 3, 3, device="cuda")
    with lipnet.bounds.cuda_graphs(False):
        expected = [_bound_and_grad(stack), _bound_and_grad(2 * stack)]
    for _ in range(3):
        got = [_bound_and_grad(stack), _bound_and_grad(2 * stack)]
        for (bound, grad), (bound_e, grad_e) in zip(got, expected):
            # Replayed, a bound's launches are free and it takes the arithmetic path (the
            # autocorrelation and the real form): the eager one's up to rounding.
            torch.testing.assert_close(bound, bound_e, rtol=1e-5, atol=0)
            assert_gradients_agree(grad, grad_e)
    assert len(_bound_graphs) == 2
    # Two forward passes before their backward passes: each gradient is its own.
    first, second = (w.detach().requires_grad_() for w in (stack, 2 * stack))
    bounds = [conv2d_spectral_norm(w, 16, padding=1) for w in (first, second)]
    (bounds[0].sum() + 3 * bounds[1].sum()).backward()
    with lipnet.bounds.cuda_graphs(False):
        first_e, second_e = (w.detach().requires_grad_() for w in (stack, 2 * stack))
        (conv2d_spectral_norm(first_e, 16, padding=1).sum() + 3 * conv2d_spectral_norm(second_e, 16, padding=1).sum()
         ).backward()
    assert_gradients_agree(first.grad, first_e.grad)
    assert_gradients_agree(second.grad, second_e.grad)
    fc = lipnet.nn.GramLinear(300, 10).cuda()
    with lipnet.bounds.cuda_graphs(False):
        w_e = fc.normalized_weight()
        (g_e,) = torch.autograd.grad(w_e.square().sum(), fc.weight)
    for _ in range(2):
        w = fc.normalized_weight()
        (g,) = torch.autograd.grad(w.square().sum(), fc.weight)
        torch.testing.assert_close(w, w_e, rtol=1e-5, atol=0)
        assert_gradients_agree(g, g_e)
    assert len(_bound_graphs) == 4


def test_network_training_with_bound_graphs_matches_eager(_bound_graphs):
    """A LiResNet trained a few bf16 steps with its bounds replayed follows the eager run."""
    import copy

    torch.manual_seed(0)
    model = build_model("liresnet-xs", in_channels=3, num_classes=10, input_size=16).cuda().train()
    reference = copy.deepcopy(model)
    x, y = torch.rand(16, 3, 16, 16, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def run(net, graphs):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        with lipnet.bounds.cuda_graphs(graphs):
            for _ in range(4):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(net(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses
    torch.testing.assert_close(run(model, True), run(reference, False), rtol=1e-3, atol=1e-4)
    assert _bound_graphs  # the bounds were replayed
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_bound_inside_a_callers_graph_capture_is_not_replayed(_bound_graphs):
    """While the caller captures a CUDA graph, the bound's kernels go into that graph."""
    weight = torch.randn(8, 8, 3, 3, device="cuda")
    with lipnet.bounds.cuda_graphs(False):
        eager = conv2d_spectral_norm(weight, 8, padding=1)  # warm-up: caches, cuBLAS
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        conv2d_spectral_norm(weight, 8, padding=1)
    torch.cuda.current_stream().wait_stream(side)
    _bound_graphs.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = conv2d_spectral_norm(weight, 8, padding=1)
    graph.replay()
    torch.cuda.synchronize()
    assert not _bound_graphs
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=0)  # captured: the real form


def test_nearest_upsampling_bound_covers_the_cuda_index_map():
    """torch's CUDA kernels compute nearest upsampling's source index in float arithmetic for
    every dtype (its CPU kernels in double for float64): the bound, read on the CPU, must cover
    the map the module applies on the GPU (2 samples to 82 copy one of them 42 times there)."""
    from torch import nn

    for size, shape in ((82, (1, 2)), (94, (3, 2)), ((58, 82), (1, 35, 2))):
        module = nn.Upsample(size=size)
        bound = lipschitz_bound(module, shape)
        n = 1
        for s in shape:
            n *= s
        for dtype in (torch.float64, torch.float32):
            basis = torch.eye(n, dtype=dtype, device="cuda").reshape(n, *shape)
            with torch.no_grad():
                dense = module(basis).double().reshape(n, -1).cpu()
            assert bound >= float(torch.linalg.matrix_norm(dense, 2)) * (1 - 1e-14), (size, shape, dtype)


def test_group_sort_and_input_normalization_on_the_gpu_match_the_cpu():
    """GroupSort (a sort per group) and InputNormalization (now computed in the promoted
    dtype) give the CPU's outputs and gradients on CUDA, also under bf16 autocast."""
    from torch import nn

    from lipnet.nn import GramConv2d, GramLinear, GroupSort, InputNormalization

    torch.manual_seed(0)
    net = nn.Sequential(InputNormalization([0.5, 0.4, 0.3], [0.25, 0.2, 0.3]), GramConv2d(3, 8, 3, padding=1),
                        GroupSort(4), nn.Flatten(), GramLinear(8 * 8 * 8, 10)).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    gpu = copy.deepcopy(net).cuda()
    for model, inp in ((net, x), (gpu, x.cuda())):
        inp.requires_grad_(True)
        model(inp).square().sum().backward()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), net(x), rtol=1e-10, atol=1e-12)
    for p, q in zip(net.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-8, atol=1e-10)
    assert lipschitz_bound(gpu.eval(), (3, 8, 8)) == pytest.approx(lipschitz_bound(net.eval(), (3, 8, 8)), rel=1e-9)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu.float().train()(x.float().cuda())
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
