"""CIFAR-100: the CIFAR-10 recipe with 100 classes (same network, same budget)."""

from recipes.cifar10 import RECIPE as CIFAR10

RECIPE = CIFAR10.replace(dataset="cifar100", out_dir="runs/cifar100")
