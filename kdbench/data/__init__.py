"""Data: data sets held as tensors, deterministic stratified splits, the student's label budget, on-device augmentation."""
from kdbench.data.datasets import DATASETS, FILE_DATASETS, DataBundle, TensorSet, check_data_root, load_data
from kdbench.data.pipeline import load_timm_data
from kdbench.data.readers import RawData

__all__ = ["DATASETS", "FILE_DATASETS", "DataBundle", "RawData", "TensorSet", "check_data_root", "load_data",
           "load_timm_data"]
