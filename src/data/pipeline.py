"""Training and evaluation pipelines: ImageFolderDataset + MindSpore's C++ vision ops.

Training: random resized crop through the fused decode-and-crop op (only the crop is decoded at
full resolution: the cheapest way to feed ImageNet), or resize + random/centre crop for the
finetuning recipes; optional horizontal flip; Normalize; HWC -> CHW. Evaluation: decode, resize,
centre crop, Normalize, CHW. Batches: image float32 (N, 3, S, S), label int32 (N,).

Randomness (shuffle order and augmentation) comes from MindSpore's global dataset seed, which the
pipeline reads when its iterator is created (not when it is built). ``create_dataset(training=
True)`` sets that seed to ``seed``: create the iterator (or call model.train) before building
another training pipeline, and the same seed then gives the same batches, in a fresh process too
(a resumed run rebuilding epoch e with seed cfg.seed + e sees the same order).

Test-time flip averaging (cfg.eval_flip_average): the eval pipeline is the same; the evaluation
network flips the normalised batch in the graph (flipping commutes with per-channel Normalize), so
one pipeline serves both (src/evaluate.py).
"""
import os

from .bad_images import read_image, set_bad_image_mode
from .folder import DatasetError, count_images, image_extensions_all_cases, scan_image_folder

# Aspect-ratio range of random resized crop (torchvision's and fast-MPN-COV's).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _workers(cfg):
    # MindSpore refuses more workers than CPUs; the configs are written for GPU servers.
    return max(1, min(int(cfg.num_parallel_workers), os.cpu_count() or 1))


def _size(v):
    return int(v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def train_ops(cfg):
    """The per-image C++ ops of training, in order (decode included; the bytes come from read_image)."""
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
    return ops + [vision.Normalize(list(cfg.mean), list(cfg.std)), vision.HWC2CHW()]


def eval_ops(cfg):
    """The per-image C++ ops of evaluation: decode, resize, centre crop, normalise, CHW."""
    import mindspore.dataset.vision as vision
    s = int(cfg.image_size)
    return [vision.Decode(), vision.Resize(_size(cfg.eval_resize)), vision.CenterCrop(s),
            vision.Normalize(list(cfg.mean), list(cfg.std)), vision.HWC2CHW()]


def create_dataset(split_dir, cfg, training, num_shards=1, shard_id=0, seed=0):
    """A batched dataset over split_dir/<class>/<image> with columns image (float32 NCHW), label (int32).

    Labels follow the sorted class folder names. training: shuffled (seeded by `seed`, which is
    set as MindSpore's global dataset seed), augmented, last partial batch dropped; otherwise in
    file order with every image kept. num_shards/shard_id: this rank's part (every shard gets the
    same number of samples). Raises DatasetError for a missing/empty folder or a class count that
    differs from cfg.num_classes. Also applies cfg.bad_image_mode and cfg.prefetch_size (global
    MindSpore dataset settings).
    """
    import mindspore.dataset as ds

    classes = scan_image_folder(split_dir)
    if len(classes) != cfg.num_classes:
        raise DatasetError(f"{split_dir} has {len(classes)} class folders but num_classes is "
                           f"{cfg.num_classes} (set --num_classes={len(classes)} or fix the folders)")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
    workers = _workers(cfg)
    set_bad_image_mode(cfg.bad_image_mode)
    ds.config.set_prefetch_size(int(cfg.prefetch_size))
    if training:
        ds.config.set_seed(int(seed))
    shard = dict(num_shards=num_shards, shard_id=shard_id) if num_shards > 1 else {}
    data = ds.ImageFolderDataset(split_dir, num_parallel_workers=workers, shuffle=bool(training),
                                 extensions=image_extensions_all_cases(),
                                 class_indexing={c: i for i, c in enumerate(classes)}, decrypt=read_image,
                                 **shard)
    ops = train_ops(cfg) if training else eval_ops(cfg)
    data = data.map(operations=ops, input_columns="image", num_parallel_workers=workers)
    return data.batch(int(cfg.batch_size), drop_remainder=bool(training), num_parallel_workers=workers)


def shard_samples(split_dir, classes, shard_id, num_shards):
    """Real images in shard ``shard_id`` of an unshuffled split: MindSpore deals samples round-robin
    and pads shards to equal length with repeats, which evaluation must not count."""
    total = sum(count_images(split_dir, classes).values())
    return len(range(shard_id, total, num_shards))
