"""Data: iNaturalist 12K, any ImageFolder tree and the packaged sample — download, verify,
split, augment, load."""

from finetune.data.datasets import (
    DataSummary,
    ImageDataset,
    ImageFolderData,
    SeededShuffle,
    default_num_workers,
)
from finetune.data.decoded import DecodedImages
from finetune.data.download import INaturalist12K, download_file, safe_extract, verify_file
from finetune.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb
from finetune.data.preprocessing import Preprocessing, preprocessing_from_weights
from finetune.data.resized import default_cache_root, resize_tree
from finetune.data.sample import sample_dataset
from finetune.data.transforms import EvalTransform, TrainTransform
from finetune.data.tree import (
    DATA_ENV,
    ImageSplits,
    find_tree,
    resolve_data_root,
    stratified_split,
)

__all__ = [
    "DATA_ENV",
    "IMAGE_EXTENSIONS",
    "DataSummary",
    "DecodedImages",
    "EvalTransform",
    "INaturalist12K",
    "ImageDataset",
    "ImageFolderData",
    "ImageSplits",
    "Preprocessing",
    "SeededShuffle",
    "TrainTransform",
    "default_cache_root",
    "default_num_workers",
    "download_file",
    "find_tree",
    "load_rgb",
    "preprocessing_from_weights",
    "resize_tree",
    "resolve_data_root",
    "safe_extract",
    "sample_dataset",
    "stratified_split",
    "to_rgb",
    "verify_file",
]
