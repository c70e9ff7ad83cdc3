"""Datasets (CIFAR-10, image folders, embedded digits) and the resumable, sharded training batch stream."""

from data.datasets import DATASETS, DataError, build_dataset
from data.loader import BatchStream

__all__ = ["DATASETS", "BatchStream", "DataError", "build_dataset"]
