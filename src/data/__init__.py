"""Data: ImageNet-style folders, MindSpore pipelines, bad-image handling and the digits demo.

MindSpore is imported only inside the functions that build pipelines, so the folder checks,
check_dataset.py and the demo writer start fast.
"""
from .bad_images import (BadImageMonitor, check_image, find_unreadable_images, image_problem, list_image_files,
                         pipeline_errors, read_image, set_bad_image_mode)
from .demo import maybe_prepare_demo, prepare_digits
from .folder import (DatasetError, IMAGE_EXTENSIONS, check_class_match, count_images, describe_unread_files,
                     scan_image_folder, unread_files)
from .pipeline import create_dataset, eval_ops, shard_samples, train_ops

__all__ = ["BadImageMonitor", "DatasetError", "IMAGE_EXTENSIONS", "check_class_match", "check_image",
           "count_images", "create_dataset", "describe_unread_files", "eval_ops", "find_unreadable_images",
           "image_problem", "list_image_files", "maybe_prepare_demo", "pipeline_errors", "prepare_digits", "read_image",
           "scan_image_folder", "set_bad_image_mode", "shard_samples", "train_ops", "unread_files"]
