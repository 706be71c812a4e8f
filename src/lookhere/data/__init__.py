"""Datasets: resolution-native synthetic scenes, Fashion-MNIST, image folders and Hugging Face."""

from .factory import DATASETS, DataSpec, SkipBad, build_dataset, collate, eval_transform
from .fashion_mnist import FashionMNIST, read_idx
from .synthetic import SyntheticScenes, render

__all__ = ["DATASETS", "DataSpec", "FashionMNIST", "SkipBad", "SyntheticScenes", "build_dataset", "collate",
           "eval_transform", "read_idx", "render"]
