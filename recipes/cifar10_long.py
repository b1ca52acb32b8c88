"""CIFAR-10 for users with hours of GPU: a wider, deeper LiResNet trained 10x longer."""

from recipes.cifar10 import RECIPE as CIFAR10

RECIPE = CIFAR10.replace(model="liresnet-m", epochs=600, warmup_epochs=10, out_dir="runs/cifar10-long")
