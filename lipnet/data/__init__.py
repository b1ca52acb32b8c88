"""Data sets as whole uint8 tensors, batched and augmented on the device that trains."""

from lipnet.data.augment import random_crop_flip
from lipnet.data.loader import DeviceLoader, epoch_generator
from lipnet.data.registry import DATASETS, DatasetInfo, ImageDataset, dataset_info
from lipnet.data.sources import DatasetError, DatasetNotFoundError, default_data_dir, load_dataset, read_idx
from lipnet.data.synthetic import synthetic_dataset, write_npz

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DeviceLoader",
    "ImageDataset",
    "dataset_info",
    "default_data_dir",
    "epoch_generator",
    "load_dataset",
    "random_crop_flip",
    "read_idx",
    "synthetic_dataset",
    "write_npz",
]
