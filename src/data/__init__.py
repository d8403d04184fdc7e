"""Data: ImageNet-style folders, MindSpore pipelines, bad-image handling and the digits demo.

MindSpore is imported only inside the functions that build pipelines, so the folder checks,
check_dataset.py and the demo writer start fast.
"""
from .bad_images import (BadImageMonitor, DATASET_WARNINGS_ENV, check_image, find_unreadable_images,
                         list_image_files, set_bad_image_mode)
from .demo import maybe_prepare_demo, prepare_digits
from .folder import DatasetError, IMAGE_EXTENSIONS, check_class_match, count_images, scan_image_folder
from .pipeline import create_dataset, eval_ops, shard_samples, train_ops

__all__ = ["BadImageMonitor", "DATASET_WARNINGS_ENV", "DatasetError", "IMAGE_EXTENSIONS", "check_class_match",
           "check_image", "count_images", "create_dataset", "eval_ops", "find_unreadable_images",
           "list_image_files", "maybe_prepare_demo", "prepare_digits", "scan_image_folder",
           "set_bad_image_mode", "shard_samples", "train_ops"]
