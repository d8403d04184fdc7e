"""Training and evaluation pipelines: ImageFolderDataset + MindSpore's C++ vision ops, built once per run.

Training: random resized crop through the fused decode-and-crop op (only the crop is decoded at
full resolution: the cheapest way to feed ImageNet), or resize + random/centre crop for the
finetuning recipes; optional horizontal flip; HWC -> CHW. Evaluation: decode, resize, centre crop,
CHW. Batches: image uint8 (N, 3, S, S) on the 0-255 scale, label int32 (N,): a quarter of the bytes
of float32 on the way to the device, where the network normalises them (src/models/preprocess.py).

``FolderPipeline`` lists nothing itself: it reads a FileList (listed once per run) through a sampler
that hands MindSpore each epoch's order (src/data/order.py), and its MindSpore iterator lives for the
whole run, so neither the listing nor the pipeline is rebuilt between epochs. Its random crops and
flips come from MindSpore's global dataset seed, set to seed + the first epoch it serves when its
iterator starts: a resumed run reads the same images in the same order as the interrupted one, with
fresh augmentation draws (bitwise replay would need a new pipeline, and a new listing, every epoch).
"""
import os

from .bad_images import set_bad_image_mode
from .folder import DatasetError, FileList, image_extensions_all_cases
from .order import EpochOrder

# Aspect-ratio range of random resized crop (torchvision's and fast-MPN-COV's).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def usable_cpus():
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets, msrun --bind_core)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def data_workers(configured, local_ranks=1, cpus=None, machine_cpus=None):
    """Map workers of one process: the configured per-machine count divided among the machine's
    ranks, never more than the CPUs that are this process's share (its affinity mask when the
    launcher pinned it, else the machine's CPUs divided among its ranks); at least 1."""
    local_ranks = max(1, int(local_ranks))
    cpus = usable_cpus() if cpus is None else int(cpus)
    machine_cpus = (os.cpu_count() or cpus) if machine_cpus is None else int(machine_cpus)
    share = cpus if cpus < machine_cpus else cpus // local_ranks
    return max(1, min(int(configured) // local_ranks, share))


def _size(v):
    return int(v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def train_ops(cfg):
    """The per-image C++ ops of training, in order (decode included), ending in uint8 CHW."""
    import mindspore.dataset.vision as vision
    s = int(cfg.image_size)
    if cfg.train_transform == "random_resized_crop":
        ops = [vision.RandomCropDecodeResize((s, s), scale=tuple(cfg.crop_scale), ratio=CROP_RATIO)]
    elif cfg.train_transform == "resize_random_crop":
        ops = [vision.Decode(), vision.Resize(_size(cfg.train_resize)),
               vision.RandomCrop(s, pad_if_needed=True)]
    elif cfg.train_transform == "resize_center_crop":
        ops = [vision.Decode(), vision.Resize(_size(cfg.train_resize)), vision.CenterCrop(s)]
    else:
        raise ValueError(f"unknown train_transform '{cfg.train_transform}'")
    if cfg.hflip:
        ops.append(vision.RandomHorizontalFlip(0.5))
    return ops + [vision.HWC2CHW()]


def eval_ops(cfg):
    """The per-image C++ ops of evaluation: decode, resize, centre crop, CHW (uint8)."""
    import mindspore.dataset.vision as vision
    s = int(cfg.image_size)
    return [vision.Decode(), vision.Resize(_size(cfg.eval_resize)), vision.CenterCrop(s), vision.HWC2CHW()]


def _sampler(order, first_epoch, skip_batches):
    """A MindSpore sampler serving order.indices(first_epoch, skip), then epochs first_epoch + 1, ...:
    MindSpore asks it once per epoch, in order, from its loader thread."""
    import mindspore.dataset as ds

    class EpochSampler(ds.Sampler):
        def __init__(self):
            super().__init__()
            self.next_epoch, self.skip = first_epoch, skip_batches

        def __iter__(self):
            return iter(self.get_indices().tolist())

        def get_indices(self):  # MindSpore's version walks the indices one by one in Python
            indices = order.indices(self.next_epoch, self.skip)
            self.next_epoch, self.skip = self.next_epoch + 1, 0
            self.batch_sizes.append([0] * len(indices))
            return indices
    return EpochSampler()


class FolderPipeline:
    """Batches of one split for the whole run: ``epoch(e, first_batch)`` yields epoch e's
    (images uint8 NCHW, labels int32), starting at batch ``first_batch`` (a resumed epoch).

    files: a FileList; bad: {index: reason} from the start-up check (those files are never read);
    training: shuffled per epoch and augmented, whole batches only (else every readable image in
    file order); num_shards/shard_id: this rank's part; seed: epoch e's order is seeded by seed + e;
    local_ranks: processes sharing this machine's cores; max_batches: per epoch (0 = all).
    Epochs are served in sequence; asking for another one than the next is a bug and raises.
    """

    def __init__(self, files, cfg, training, bad=None, num_shards=1, shard_id=0, seed=0, local_ranks=1,
                 max_batches=0):
        if len(files.classes) != cfg.num_classes:
            raise DatasetError(f"{files.split_dir} has {len(files.classes)} class folders but num_classes is "
                               f"{cfg.num_classes} (set --num_classes={len(files.classes)} or fix the folders)")
        self.files, self.cfg, self.training = files, cfg, bool(training)
        self.order = EpochOrder(len(files), seed, training, int(cfg.batch_size), num_shards, shard_id,
                                bad or {}, cfg.bad_image_mode, max_batches)
        self.workers = data_workers(cfg.num_parallel_workers, local_ranks)
        self._iterator, self._next, self._open = None, None, False

    def get_dataset_size(self):
        """Batches per full epoch on this rank."""
        return self.order.batches

    @property
    def num_samples(self):
        """Images per full epoch on this rank."""
        return self.order.samples

    def _start(self, epoch, first_batch, output_numpy):
        import mindspore.dataset as ds
        cfg, w = self.cfg, self.workers
        set_bad_image_mode(cfg.bad_image_mode)
        ds.config.set_prefetch_size(int(cfg.prefetch_size))
        if self.training:
            ds.config.set_seed(int(self.order.seed + epoch))  # read when the iterator starts
        # Reading a file is cheap in C++: the loader and the batcher need a fraction of the map's threads.
        data = ds.ImageFolderDataset(self.files.split_dir, num_parallel_workers=max(1, w // 2),
                                     sampler=_sampler(self.order, epoch, first_batch),
                                     extensions=image_extensions_all_cases(),
                                     class_indexing={c: i for i, c in enumerate(self.files.classes)})
        data = data.map(operations=train_ops(cfg) if self.training else eval_ops(cfg), input_columns="image",
                        num_parallel_workers=w)
        data = data.batch(int(cfg.batch_size), drop_remainder=self.training, num_parallel_workers=max(1, w // 4))
        self._iterator = data.create_tuple_iterator(num_epochs=-1, output_numpy=output_numpy)
        self._next, self._open = epoch, False

    def epoch(self, epoch=None, first_batch=0, output_numpy=False):
        """Iterator over the batches of ``epoch`` (default: the next one) from batch ``first_batch``
        (only for the first epoch served); MindSpore Tensors, or NumPy arrays with output_numpy."""
        if self._iterator is None:
            self._start(epoch if epoch is not None else (self._next or 0), first_batch, output_numpy)
        elif first_batch:
            raise RuntimeError("first_batch applies to the first epoch a FolderPipeline serves only")
        elif self._open:  # the caller left the previous epoch early: its last batches go unused
            for _ in self._iterator:
                pass
        epoch = self._next if epoch is None else epoch
        if epoch != self._next:
            raise RuntimeError(f"FolderPipeline serves epochs in order: asked for {epoch}, next is {self._next}")
        self._next, self._open = self._next + 1, True
        return self._batches()

    def _batches(self):
        for batch in self._iterator:  # MindSpore ends each epoch with StopIteration
            yield batch
        self._open = False

    def close(self):
        """Stop the pipeline's threads (also done when the object is collected)."""
        if self._iterator is not None:
            self._iterator.stop()
            self._iterator = None


def create_dataset(split_dir, cfg, training, num_shards=1, shard_id=0, seed=0, bad=None, local_ranks=1):
    """A FolderPipeline over split_dir/<class>/<image> (listed now), for scripts and tests that
    read one split: epoch e of a training pipeline is seeded by seed + e.

    Labels follow the sorted class folder names. Raises DatasetError for a missing/empty folder or a
    class count that differs from cfg.num_classes. ``bad``: {index: reason} of files not to read
    (src.data.bad_images.check_files); None checks them here, and with bad_image_mode=error a
    refused file raises DatasetError.
    """
    from .bad_images import bad_files, bad_image_lines, check_files
    files = FileList(split_dir)
    if bad is None:
        bad = bad_files(files, check_files(files.paths))
        bad_image_lines(files, bad, cfg.bad_image_mode)
    return FolderPipeline(files, cfg, training, bad, num_shards, shard_id, seed, local_ranks)
