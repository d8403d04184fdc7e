"""A training run's data, decided by all ranks together: the demo dataset written, the splits listed
and every file checked once per run, and one pipeline per split kept for the whole run.

Whatever depends on one rank (rank 0 writing the demo, a folder missing on one machine, a file check)
ends in an agreement of src.ranks.Ranks, so no rank waits for a file or stops alone. The file check is
shared: each rank checks a part and the verdicts are summed, so every rank knows every bad file.
"""
import os
import time

from .bad_images import BadImageMonitor, bad_image_lines, check_lists, split_verdicts
from .demo import maybe_prepare_demo, prepare_digits
from .folder import FileList, check_class_match, describe_unread_files, scan_image_folder, split_dir
from .pipeline import FolderPipeline, data_workers


class RunData:
    """After ``prepare()``: ``classes`` (sorted folder names), ``train_dir``, ``val_dir``, ``has_val``,
    ``files`` {training: FileList}, ``bad`` {training: refused file indices} and ``bad_images`` (the
    per-epoch count of refused files); ``pipeline(training)`` gives the split's FolderPipeline."""

    def __init__(self, cfg, dist, ranks, log, local_ranks):
        self.cfg, self.dist, self.ranks, self.log = cfg, dist, ranks, log
        self.local_ranks = local_ranks  # processes on this machine: they share its workers
        self._pipelines = {}

    def prepare(self):
        cfg, is_main = self.cfg, self.dist.is_main
        made = self.ranks.agree("writing the demo dataset", lambda: maybe_prepare_demo(cfg) if is_main else None)
        if cfg.demo_dataset and self.ranks.broadcast(made is not None) and not is_main:
            prepare_digits(cfg.data_path)  # returns at once where rank 0's files are visible
        self.ranks.agree("reading the dataset folders", self._scan_folders)
        self._check_images()

    def _scan_folders(self):
        """List the splits once per run (train_split, and val_split when that folder exists)."""
        cfg = self.cfg
        self.train_dir = split_dir(cfg, "train_split")
        self.val_dir = os.path.join(cfg.data_path, cfg.val_split)
        self.classes = scan_image_folder(self.train_dir)
        self.has_val = os.path.isdir(self.val_dir)
        self.files = {True: FileList(self.train_dir, self.classes)}
        if self.has_val:
            check_class_match(self.classes, scan_image_folder(self.val_dir), cfg.train_split, cfg.val_split)
            self.files[False] = FileList(self.val_dir, self.classes)
        else:
            self.log.warning(f"no {self.val_dir} (val_split={cfg.val_split!r}): training without evaluation")

    def _check_images(self):
        """Check every file once for the run (src.data.bad_images), each rank a share; the sum over
        ranks gives every rank every verdict. bad_image_mode=error stops here, naming a file."""
        lists, part, t0 = list(self.files.values()), (self.dist.rank, self.dist.group_size), time.time()
        codes = self.ranks.agree("checking the image files", lambda: check_lists(lists, part))
        self.bad = dict(zip(self.files, split_verdicts(lists, self.ranks.sum(codes))))
        for training, files in self.files.items():
            for line in bad_image_lines(files, self.bad[training], self.cfg.bad_image_mode):
                self.log.warning(line)
        self.bad_images = BadImageMonitor(len(self.bad[True]))
        self.log.info(f"data: {' and '.join(f'{len(f)} images in {f.split_dir}' for f in lists)}, checked in "
                      f"{time.time() - t0:.1f} s; {self.local_ranks} process(es) on this machine, "
                      f"{data_workers(self.cfg.num_parallel_workers, self.local_ranks)} pipeline worker(s) each")

    def pipeline(self, training):
        """The split's pipeline, built on first use and kept for the run (src.data.FolderPipeline)."""
        if training not in self._pipelines:
            cfg = self.cfg
            batches = cfg.max_steps_per_epoch * cfg.grad_accumulation_steps if training else 0
            self._pipelines[training] = FolderPipeline(
                self.files[training], cfg, training, self.bad[training], self.dist.group_size, self.dist.rank,
                cfg.seed, self.local_ranks, batches)
        return self._pipelines[training]

    def unread_file_lines(self):
        """Lines naming files of formats the decoder cannot read (GIF, WebP, sub-folders), once per run."""
        splits = [self.train_dir] + ([self.val_dir] if self.has_val else [])
        return [line for split in splits for line in describe_unread_files(split)]
