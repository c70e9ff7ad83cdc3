"""Datasets (CIFAR-10, image folders, embedded digits) behind one registry, and the resumable, sharded batch stream.

``DATASETS`` (name -> dataset class) is the registry: ``DATASETS["toy"] = ToyDataset`` adds one
(``data/datasets.py`` says what the class provides); ``build_dataset`` builds one by name.
"""

from data.base import ImageDataset, TensorImageDataset
from data.datasets import DATASETS, DataError, build_dataset
from data.loader import BatchStream

__all__ = ["DATASETS", "BatchStream", "DataError", "ImageDataset", "TensorImageDataset", "build_dataset"]
