"""Data: iNaturalist 12K and any ImageFolder tree — download, verify, split, augment, load."""

from finetune.data.cache import default_cache_root, resize_tree
from finetune.data.datasets import (
    DataSummary,
    ImageDataset,
    ImageFolderData,
    SeededShuffle,
    default_num_workers,
    find_tree,
    stratified_split,
)
from finetune.data.download import INaturalist12K, download_file, safe_extract, verify_file
from finetune.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb
from finetune.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSummary",
    "EvalTransform",
    "INaturalist12K",
    "ImageDataset",
    "ImageFolderData",
    "SeededShuffle",
    "TrainTransform",
    "default_cache_root",
    "default_num_workers",
    "download_file",
    "find_tree",
    "load_rgb",
    "resize_tree",
    "safe_extract",
    "stratified_split",
    "to_rgb",
    "verify_file",
]
