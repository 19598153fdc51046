"""Data: data sets held as tensors, deterministic stratified splits, the student's label budget, on-device augmentation."""
from kdbench.data.datasets import DATASETS, DataBundle, TensorSet, load_data

__all__ = ["DATASETS", "DataBundle", "TensorSet", "load_data"]
