"""Fashion-MNIST on a laptop CPU: a small ConvNet trained for certified radius 0.5 in minutes."""

from lipnet.training import TrainConfig

RECIPE = TrainConfig(
    dataset="fashion-mnist",
    model="convnet-s",
    epochs=8,
    batch_size=256,
    lr=3e-3,
    warmup_epochs=0.5,
    loss="ce",
    train_eps=0.5,
    temperature=1.0,
    eval_eps=(0.1, 0.25, 0.5, 1.0),
    out_dir="runs/fashion-mnist",
)
