"""Data: ImageNet-style folders listed once per run, MindSpore pipelines, bad-image checks and the digits demo.

MindSpore is imported only inside the functions that build pipelines, so the folder checks,
check_dataset.py and the demo writer start fast.
"""
from .bad_images import (REASONS, bad_files, bad_image_lines, check_files, check_image, check_lists, file_problem,
                         find_unreadable_images, image_problem, list_image_files, pipeline_errors, set_bad_image_mode,
                         split_verdicts)
from .demo import maybe_prepare_demo, prepare_digits
from .folder import (DatasetError, FileList, IMAGE_EXTENSIONS, check_class_match, describe_unread_files,
                     scan_image_folder, split_dir, unread_files)
from .order import EpochOrder
from .pipeline import FolderPipeline, create_dataset, data_workers, eval_ops, train_ops

__all__ = ["DatasetError", "EpochOrder", "FileList", "FolderPipeline", "IMAGE_EXTENSIONS", "REASONS", "bad_files",
           "bad_image_lines", "check_class_match", "check_files", "check_image", "check_lists", "create_dataset",
           "data_workers", "describe_unread_files", "eval_ops", "file_problem", "find_unreadable_images",
           "image_problem", "list_image_files", "maybe_prepare_demo", "pipeline_errors", "prepare_digits",
           "scan_image_folder", "set_bad_image_mode", "split_dir", "split_verdicts", "train_ops", "unread_files"]
