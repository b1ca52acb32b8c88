"""MNIST: the Fashion-MNIST recipe on digits (CPU-friendly), trained for radius 1.0."""

from lipnet.training import TrainConfig

RECIPE = TrainConfig(
    dataset="mnist",
    model="convnet-s",
    epochs=10,
    batch_size=256,
    lr=3e-3,
    warmup_epochs=0.5,
    loss="ce",
    train_eps=1.0,
    temperature=1.0,
    eval_eps=(0.5, 1.0, 1.58, 2.0),
    out_dir="runs/mnist",
)
