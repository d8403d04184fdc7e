"""The demo dataset: scikit-learn's handwritten digits written as ImageNet-style folders.

load_digits ships with scikit-learn (no download): 1797 real 8x8 scans of handwritten digits,
16 grey levels. They are written as 32x32 RGB PNGs (bicubic upscaling, white ink on black) in
root/train/<digit>/ and root/val/<digit>/ with a fixed stratified 80/20 split (1437 / 360), so the
demo runs through exactly the same pipeline as ImageNet.

Written once: a marker file (written last) says the folders are complete; a half-written folder
(killed run) is rebuilt. Files are written to a temporary folder and moved into place. A lock
file serialises concurrent writers (every rank of a distributed run may call prepare_digits).
"""
import fcntl
import json
import os
import shutil
import tempfile

from .folder import DatasetError

MARKER = ".digits_complete"
IMAGE_SIDE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
CLASSES = [str(d) for d in range(10)]
_VERSION = 1  # bump when the written images change, so old folders are rebuilt


def _expected():
    return {"version": _VERSION, "side": IMAGE_SIDE, "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED}


def _is_complete(root):
    try:
        with open(os.path.join(root, MARKER), "r", encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if all(info.get(k) == v for k, v in _expected().items()) else None


def _looks_like_demo(split_dir):
    """True if split_dir holds only digit class folders of PNGs (safe to delete and rebuild)."""
    for dirpath, dirnames, filenames in os.walk(split_dir):
        if dirpath == split_dir:
            if filenames or any(d not in CLASSES for d in dirnames):
                return False
        elif dirnames or any(not f.endswith(".png") for f in filenames):
            return False
    return True


def digits_split():
    """(x_train, y_train, x_val, y_val): the 8x8 images (float 0..16) and labels, fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    return tuple(train_test_split(d.images, d.target, test_size=VAL_FRACTION, stratify=d.target,
                                  random_state=SPLIT_SEED)[i] for i in (0, 2, 1, 3))


def _to_rgb(img8):
    import numpy as np
    from PIL import Image
    grey = Image.fromarray(np.round(img8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return grey.resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC).convert("RGB")


def _write_split(split_dir, images, labels):
    counters = {c: 0 for c in CLASSES}
    for c in CLASSES:
        os.makedirs(os.path.join(split_dir, c))
    for img, label in zip(images, labels):
        c = str(int(label))
        _to_rgb(img).save(os.path.join(split_dir, c, f"{c}_{counters[c]:04d}.png"))
        counters[c] += 1


def prepare_digits(root):
    """Write the digits demo dataset under root (train/ and val/) unless it is already complete.

    Returns {"root", "train", "val", "created"}: image counts and whether this call wrote them.
    Raises DatasetError rather than delete a train/ or val/ folder that is not a demo folder.
    """
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{os.path.basename(root)}.lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _is_complete(root)
        if info is not None:
            return {"root": root, "train": info["train"], "val": info["val"], "created": False}
        for split in ("train", "val"):
            d = os.path.join(root, split)
            if os.path.exists(d) and not _looks_like_demo(d):
                raise DatasetError(f"{d} exists and is not a digits demo folder; refusing to overwrite it "
                                   f"(use another data_path, or set demo_dataset to '' to train on it)")
        x_tr, y_tr, x_va, y_va = digits_split()
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        try:
            _write_split(os.path.join(tmp, "train"), x_tr, y_tr)
            _write_split(os.path.join(tmp, "val"), x_va, y_va)
            info = dict(_expected(), train=len(y_tr), val=len(y_va))
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                json.dump(info, f)
            if not os.path.exists(root):
                os.rename(tmp, root)  # one atomic step
            else:
                # root exists (empty, or half-written): swap the splits in, marker last
                for split in ("train", "val"):
                    old = os.path.join(root, split)
                    if os.path.exists(old):
                        shutil.rmtree(old)
                    os.rename(os.path.join(tmp, split), old)
                os.replace(os.path.join(tmp, MARKER), os.path.join(root, MARKER))
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return {"root": root, "train": info["train"], "val": info["val"], "created": True}


def maybe_prepare_demo(cfg):
    """For cfg.demo_dataset == "digits": write the demo to cfg.data_path if it has no train/ folder
    (or a half-written demo). Returns prepare_digits' summary, or None when nothing was needed."""
    if not cfg.demo_dataset:
        return None
    if cfg.demo_dataset != "digits":
        raise DatasetError(f"unknown demo_dataset '{cfg.demo_dataset}' (the only demo is 'digits')")
    root = cfg.data_path
    if os.path.isdir(os.path.join(root, "train")) and _is_complete(root) is None \
            and not _looks_like_demo(os.path.join(root, "train")):
        return None  # the user's own data: use it as is
    return prepare_digits(root)
