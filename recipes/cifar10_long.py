"""CIFAR-10 for users with more GPU time: a wider, deeper LiResNet trained for 600 epochs."""

from recipes.cifar10 import RECIPE as CIFAR10

RECIPE = CIFAR10.replace(model="liresnet-m", epochs=600, warmup_epochs=10, out_dir="runs/cifar10-long")
