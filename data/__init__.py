"""Datasets behind the ``DATASETS`` registry (``data/datasets.py``), and the resumable, sharded batch stream."""

from data.base import ImageDataset, TensorImageDataset
from data.datasets import DATASETS, DataError, build_dataset
from data.loader import BatchStream

__all__ = ["DATASETS", "BatchStream", "DataError", "ImageDataset", "TensorImageDataset", "build_dataset"]
