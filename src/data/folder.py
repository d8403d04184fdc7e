"""ImageNet-style folders: split_dir/<class>/<image>. Checks that fail early with a clear message.

The class order is the sorted folder names (as torchvision's ImageFolder and fast-MPN-COV), so
label i means the same class on every machine and in every split.
"""
import itertools
import os

import numpy as np

from src.errors import DataError

# Extensions MindSpore's Decode reads. ImageFolderDataset matches extensions case-sensitively
# (ImageNet uses ".JPEG"), so it is given every upper/lower-case spelling of these.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


DatasetError = DataError  # the name the data modules use


def _case_variants(ext):
    return {"".join(p) for p in itertools.product(*[(c.lower(), c.upper()) for c in ext])}


def image_extensions_all_cases():
    """Every case spelling of IMAGE_EXTENSIONS, sorted (for ImageFolderDataset's `extensions`)."""
    return sorted(set().union(*(_case_variants(e) for e in IMAGE_EXTENSIONS)))


def is_image_file(name):
    """True for the files ImageFolderDataset reads (hidden ones too, e.g. macOS "._x.jpg")."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_image(class_dir):
    with os.scandir(class_dir) as it:
        return any(e.is_file() and is_image_file(e.name) for e in it)


def scan_image_folder(split_dir):
    """Sorted class names of split_dir (its non-hidden sub-folders).

    Raises DatasetError for a missing folder, a folder without class sub-folders, or a class folder
    with no image file (named in the message). Stops at the first image of each class, so it is
    quick even on ImageNet.
    """
    if not os.path.isdir(split_dir):
        raise DatasetError(f"dataset folder not found: {split_dir} (expected <data_path>/train and "
                           f"<data_path>/val with one sub-folder per class)")
    with os.scandir(split_dir) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {split_dir} (expected one sub-folder of images per class)")
    empty = [c for c in classes if not _has_image(os.path.join(split_dir, c))]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"class folder without images in {split_dir}: {shown} "
                           f"(extensions read: {', '.join(IMAGE_EXTENSIONS)}; remove the folder or add images)")
    return classes


def check_class_match(train_classes, val_classes, train_dir="train", val_dir="val"):
    """Raise DatasetError naming the classes that are in one split but not the other."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))

    def show(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    parts = []
    if only_train:
        parts.append(f"only in {train_dir}: {show(only_train)}")
    if only_val:
        parts.append(f"only in {val_dir}: {show(only_val)}")
    raise DatasetError(f"{train_dir} and {val_dir} class folders differ ({'; '.join(parts)}); "
                       f"both splits need the same class folders")


def split_dir(cfg, key):
    """<data_path>/<cfg[key]> for key "train_split" or "val_split"; DatasetError (one line, naming the
    key) when that folder does not exist."""
    path = os.path.join(cfg.data_path, str(cfg[key]))
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder not found: {path} ({key}={cfg[key]!r} under data_path "
                           f"{cfg.data_path}; set --{key} to the folder's name)")
    return path


class FileList:
    """The images of one split, listed once per run.

    ``paths[i]`` and ``labels[i]`` (int32, the index of the sorted class folder) are sample i in
    ImageFolderDataset's own order (classes sorted, then file names sorted within each class), which
    the pipeline's samplers index. ``classes`` defaults to scan_image_folder(split_dir).
    """

    def __init__(self, split_dir, classes=None):
        self.split_dir = split_dir
        self.classes = list(classes) if classes is not None else scan_image_folder(split_dir)
        paths, counts = [], []
        for c in self.classes:
            with os.scandir(os.path.join(split_dir, c)) as it:
                names = sorted(e.path for e in it if e.is_file() and is_image_file(e.name))
            paths.extend(names)
            counts.append(len(names))
        self.paths = paths
        self.labels = np.repeat(np.arange(len(self.classes), dtype=np.int32), counts)

    def __len__(self):
        return len(self.paths)


def unread_files(split_dir):
    """{kind: {class: count}} of the files under split_dir that ImageFolderDataset never reads. kind:
    an extension outside IMAGE_EXTENSIONS (".gif", ".webp", "" for none) of a class folder's file,
    SUBFOLDERS (it reads only a class folder's own files) or OUTSIDE (files beside the class
    folders, under class "-"). Hidden files and folders are left out."""
    out = {}

    def add(kind, c, n):
        if n:
            out.setdefault(kind, {}).setdefault(c, 0)
            out[kind][c] += n
    with os.scandir(split_dir) as it:
        top = [e for e in it if not e.name.startswith(".")]
    add(OUTSIDE, "-", sum(1 for e in top if not e.is_dir()))
    for c in sorted(e.name for e in top if e.is_dir()):
        with os.scandir(os.path.join(split_dir, c)) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    add(SUBFOLDERS, c, sum(len([f for f in files if not f.startswith(".")])
                                           for _, _, files in os.walk(e.path)))
                elif not is_image_file(e.name):
                    add(os.path.splitext(e.name)[1].lower(), c, 1)
    return out


SUBFOLDERS, OUTSIDE = "in sub-folders", "outside class folders"


def describe_unread_files(split_dir):
    """One line per kind of file that training never reads (see unread_files), naming its classes;
    [] when every file is read. For the trainer's log (once per run) and check_dataset.py."""
    from src.errors import name_list
    special = {SUBFOLDERS: ("file(s) in sub-folders of class folders", "only a class folder's own files are read"),
               OUTSIDE: ("file(s) beside the class folders", "each image belongs in its class folder")}
    lines = []
    for kind, per_class in sorted(unread_files(split_dir).items()):
        what, why = special.get(kind) or (f"{kind or 'extension-less'} file(s)",
                                          f"formats read: {' '.join(IMAGE_EXTENSIONS)}")
        counts = sorted(per_class.items(), key=lambda cn: (-cn[1], cn[0]))
        where = "" if kind == OUTSIDE else ": classes " + name_list([f"{c} ({n})" for c, n in counts], 6, False)
        lines.append(f"{split_dir}: {sum(per_class.values())} {what} not read ({why}){where}")
    return lines
