"""Is each library's 1-Lipschitz convolution 1-Lipschitz as applied? Exact operator norms.

    python benchmarks/peers.py                                  # CPU, every layer found
    python benchmarks/peers.py --layers lipnet,spectral_norm --steps 10

For each padding mode and stride (``c -> c`` channels, 3x3 kernel, padding 1, input
``n x n``) and each layer, this builds the linear map the layer applies (bias removed: the
outputs of the ``c n^2`` basis images minus the output of zero, in the layer's float32
arithmetic) and takes its exact spectral norm (float64 SVD), in eval mode, as inference
applies it:

* at initialization (seeded), and
* after ``--steps`` steps of adversarial training: Adam on the layer's own parameters,
  in train mode (so power iterations and caches update as in training), maximizing the
  spectral norm of the applied map, differentiated through the SVD. The largest exact norm
  seen after any step is reported.

A 1-Lipschitz layer stays at or below 1 whatever its parameters; ``exceeds`` marks a norm
above ``1 + 1e-5`` (float32 rounding of the applied weights is about 1e-7 relative).

Layers: ``lipnet`` (``GramConv2d``), ``spectral_norm`` (``torch.nn.utils.parametrizations.
spectral_norm`` of an ``nn.Conv2d``: power iteration on the reshaped kernel, which bounds
neither the convolution nor with certainty the reshaped kernel), and when installed
``deel`` (deel-torchlip's ``SpectralConv2d``), ``aoc`` (orthogonium's
``AdaptiveOrthoConv2d``) and ``aol`` (orthogonium's ``AOLConv2D``); the peers are optional
(``pip install --no-deps deel-torchlip orthogonium``).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
from torch import nn

from lipnet.nn import GramConv2d

CONFIGS = ("zeros:1", "zeros:2", "circular:1", "reflect:1", "replicate:1")
TOLERANCE = 1e-5


def _spectral_norm_conv(c: int, stride: int, mode: str) -> nn.Module:
    conv = nn.Conv2d(c, c, 3, stride=stride, padding=1, padding_mode=mode)
    return nn.utils.parametrizations.spectral_norm(conv)


def _deel(c: int, stride: int, mode: str) -> nn.Module:
    from deel.torchlip import SpectralConv2d

    return SpectralConv2d(c, c, 3, stride=stride, padding=1, padding_mode=mode)


def _aoc(c: int, stride: int, mode: str) -> nn.Module:
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d

    return AdaptiveOrthoConv2d(c, c, 3, stride=stride, padding=1, padding_mode=mode)


def _aol(c: int, stride: int, mode: str) -> nn.Module:
    from orthogonium.layers.conv.AOL import AOLConv2D

    return AOLConv2D(c, c, 3, stride=stride, padding=1, padding_mode=mode)


FACTORIES = {
    "lipnet": lambda c, stride, mode: GramConv2d(c, c, 3, stride=stride, padding=1, padding_mode=mode),
    "spectral_norm": _spectral_norm_conv,
    "deel": _deel,
    "aoc": _aoc,
    "aol": _aol,
}


def available_layers() -> list[str]:
    """The layers of ``FACTORIES`` whose library imports here."""
    found = []
    for name, factory in FACTORIES.items():
        try:
            factory(1, 1, "zeros")
        except ImportError:
            continue
        found.append(name)
    return found


def applied_matrix(layer: nn.Module, channels: int, n: int) -> torch.Tensor:
    """The matrix of the linear part of ``layer`` on ``channels x n x n`` inputs: column ``j``
    is the output of basis image ``j`` minus the output of zero (which removes the bias), in
    the dtype of the layer's parameters."""
    size = channels * n * n
    dtype = next(layer.parameters()).dtype
    basis = torch.eye(size, dtype=dtype).reshape(size, channels, n, n)
    outputs = layer(torch.cat([basis, torch.zeros(1, channels, n, n, dtype=dtype)]))
    return (outputs[:-1] - outputs[-1:]).reshape(size, -1).T


def applied_norm(layer: nn.Module, channels: int, n: int) -> float:
    """Exact spectral norm (float64 SVD) of the map ``layer`` applies in eval mode."""
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            matrix = applied_matrix(layer, channels, n).double()
    finally:
        layer.train(was_training)
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def adversarial_norms(layer: nn.Module, channels: int, n: int, steps: int, lr: float) -> list[float]:
    """Exact applied norms at initialization and after each of ``steps`` Adam steps that
    maximize the applied norm (train mode, gradients through the SVD of the applied map)."""
    norms = [applied_norm(layer, channels, n)]
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    layer.train()
    for _ in range(steps):
        loss = -torch.linalg.matrix_norm(applied_matrix(layer, channels, n), ord=2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        norms.append(applied_norm(layer, channels, n))
    return norms


def measure(name: str, config: str, channels: int, n: int, steps: int, lr: float, seed: int) -> dict:
    mode, stride = config.split(":")
    torch.manual_seed(seed)
    row = dict(layer=name, padding_mode=mode, stride=int(stride))
    start = time.perf_counter()
    try:
        layer = FACTORIES[name](channels, int(stride), mode)
        norms = adversarial_norms(layer, channels, n, steps, lr)
    except Exception as error:  # a peer may refuse a configuration: report it, go on
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:80]}")
        return row
    row.update(init=norms[0], worst=max(norms), seconds=time.perf_counter() - start)
    return row


def verdict(row: dict) -> str:
    if "error" in row:
        return "refused: " + row["error"]
    return f"exceeds 1 by {row['worst'] - 1:.2e}" if row["worst"] > 1 + TOLERANCE else "<= 1"


def format_table(rows: list[dict]) -> str:
    lines = ["| layer | padding | stride | norm at init | largest norm, adversarial | verdict |",
             "|-------|---------|-------:|-------------:|--------------------------:|---------|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['padding_mode']} | {row['stride']} | | | {verdict(row)} |")
        else:
            lines.append(f"| {row['layer']} | {row['padding_mode']} | {row['stride']} | {row['init']:.6f} | "
                         f"{row['worst']:.6f} | {verdict(row)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=None, help="comma-separated subset of " + ",".join(FACTORIES))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="padding_mode:stride, comma-separated")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="input height and width")
    parser.add_argument("--steps", type=int, default=40, help="adversarial Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = args.layers.split(",") if args.layers else available_layers()
    unknown = sorted(set(layers) - set(FACTORIES))
    if unknown:
        parser.error(f"unknown layers {unknown}; choose from {sorted(FACTORIES)}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"c = {args.channels}, n = {args.n}, {args.steps} adversarial steps, lr {args.lr}, seed {args.seed}", flush=True)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peers warn about their own settings
        for config in args.configs.split(","):
            for name in layers:
                row = measure(name, config, args.channels, args.n, args.steps, args.lr, args.seed)
                rows.append(row)
                seconds = f" ({row['seconds']:.0f} s)" if "seconds" in row else ""
                print(f"# {name} {config}: {verdict(row)}{seconds}", flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
