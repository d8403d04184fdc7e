"""Readers of the fine-grained datasets and ImageNet's validation set as their authors publish them:
each returns a ``Plan``, every image with its split and class folder, for src/data/prepare.py to write.

- CUB-200-2011 (CUB_200_2011.tgz): CUB_200_2011/images/<class>/<file>.jpg, images.txt "id relpath",
  train_test_split.txt "id is_training", image_class_labels.txt "id class_id", classes.txt "class_id
  name". Class folders: the classes.txt names ("001.Black_footed_Albatross", as images/ has them).
- FGVC-Aircraft 2013b (fgvc-aircraft-2013b.tar.gz): data/images/<id>.jpg, data/variants.txt (one name a
  line), data/images_variant_trainval.txt and _test.txt "<id> <variant name, may hold spaces>": train =
  trainval, val = test, the 100 variants.
- Stanford Cars: cars_train/, cars_test/, devkit/cars_meta.mat (class_names), devkit/cars_train_annos.mat
  and cars_test_annos_withlabels.mat (at the top or in devkit/): MATLAB struct arrays "annotations" with
  bbox_x1..bbox_y2, class (1-based), fname. val = the test split. Bounding boxes are not used.
- ImageNet (ILSVRC2012) validation: ILSVRC2012_img_val/ILSVRC2012_val_00000001.JPEG ... in one folder,
  ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID a line, image
  order) and data/meta.mat (synsets: ILSVRC2012_ID, WNID, ..., num_children): val/<wnid>/ folders.

Aircraft and Cars class folders are "NNN.<name>", NNN the class's 1-based index in the dataset's class
list (as CUB's own), so that sorted folders keep the official class order, and the name with "/"
replaced by "_" ("F-16A/B" -> "024.F-16A_B", "Ram C/V Cargo Van Minivan 2012" -> "...Ram C_V Cargo ...").
"""
import os
from dataclasses import dataclass, field

import numpy as np

from src.errors import DataError

AIRCRAFT_BANNER_PX = 20  # FGVC-Aircraft's README: the bottom 20 pixels of every image are a copyright banner


@dataclass
class Item:
    split: str        # "train" or "val"
    cls: str          # class folder name
    src: str          # the archive's file
    name: str         # file name in the class folder
    crop_bottom: int = 0  # rows cut off the bottom (Aircraft's banner), else linked or copied as it is


@dataclass
class Plan:
    title: str                      # "CUB-200-2011"
    root: str                       # the archive folder read
    classes: list                   # class folder names, in the dataset's class order
    items: list
    published: dict                 # {"train": n, "val": n, "classes": n} of the full dataset
    notes: list = field(default_factory=list)

    def count(self, split):
        return sum(1 for it in self.items if it.split == split)


def safe_folder_name(index, name):
    """"NNN.<name>" with "/" made "_" (1-based ``index``), for class names that are not folder names."""
    name = name.strip().replace("/", "_")
    if not name:
        raise DataError(f"class {index} has an empty name")
    return f"{index:03d}.{name}"


def _root(src, title, subfolder, expected):
    """``src`` or ``src/subfolder``, whichever holds any of ``expected`` (relative paths)."""
    for root in (src, os.path.join(src, subfolder)):
        if any(os.path.exists(os.path.join(root, e)) for e in expected):
            return os.path.abspath(root)
    raise DataError(f"{src} is not a {title} archive: none of {', '.join(expected)} in it or in "
                    f"{os.path.join(src, subfolder)} (pass the folder the archive was extracted into)")


def _require(root, title, names):
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise DataError(f"the {title} archive at {root} is incomplete: {', '.join(missing)} missing "
                        "(extract the whole archive again)")


def _read_lines(path, fields):
    """[(line number, [fields])] of a whitespace-separated list file; the last field keeps its spaces."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(None, fields - 1)
            if len(parts) != fields:
                raise DataError(f"{path} line {number}: expected {fields} fields, got {line!r}")
            rows.append((number, parts))
    return rows


def _read_map(path, value=str):
    """{id: value} of an "<id> <value>" list file."""
    out = {}
    for number, (key, text) in _read_lines(path, 2):
        try:
            out[key] = value(text)
        except ValueError:
            raise DataError(f"{path} line {number}: {text!r} is not what this file holds") from None
    return out


def _check_ids(reference, ref_name, other, other_name):
    missing = sorted(set(reference) - set(other), key=str)
    if missing:
        raise DataError(f"{other_name} has no line for {len(missing)} image(s) of {ref_name} (e.g. id {missing[0]}): "
                        "the list files are from different archives")


def read_cub(src, crop_banner=False):
    title = "CUB-200-2011"
    lists = ["images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt"]
    root = _root(src, title, "CUB_200_2011", lists + ["images"])
    _require(root, title, lists + ["images"])
    images = _read_map(os.path.join(root, "images.txt"))
    split = _read_map(os.path.join(root, "train_test_split.txt"), int)
    labels = _read_map(os.path.join(root, "image_class_labels.txt"))
    classes = _read_map(os.path.join(root, "classes.txt"))
    _check_ids(images, "images.txt", split, "train_test_split.txt")
    _check_ids(images, "images.txt", labels, "image_class_labels.txt")
    items = []
    for image_id, rel in images.items():
        if labels[image_id] not in classes:
            raise DataError(f"image_class_labels.txt gives image {image_id} class {labels[image_id]}, which "
                            f"classes.txt ({len(classes)} classes) does not list")
        name = classes[labels[image_id]]
        if os.path.dirname(rel) != name:
            raise DataError(f"images.txt puts image {image_id} in {rel} but image_class_labels.txt says {name}: "
                            "the list files are from different archives")
        items.append(Item("train" if split[image_id] == 1 else "val", name, os.path.join(root, "images", rel),
                          os.path.basename(rel)))
    plan = Plan(title, root, [classes[k] for k in sorted(classes, key=int)], items,
                {"train": 5994, "val": 5794, "classes": 200}, ["val/ is the official test split"])
    return _checked(plan, "classes.txt", "images.txt")


def read_aircraft(src, crop_banner=False):
    title = "FGVC-Aircraft 2013b"
    lists = ["data/variants.txt", "data/images_variant_trainval.txt", "data/images_variant_test.txt"]
    root = _root(src, title, "fgvc-aircraft-2013b", lists + ["data"])
    _require(root, title, lists + ["data/images"])
    with open(os.path.join(root, "data", "variants.txt"), encoding="utf-8") as f:
        variants = [line.strip() for line in f if line.strip()]
    folder = {v: safe_folder_name(i + 1, v) for i, v in enumerate(variants)}
    crop = AIRCRAFT_BANNER_PX if crop_banner else 0
    items = []
    for split, list_name in (("train", "images_variant_trainval.txt"), ("val", "images_variant_test.txt")):
        path = os.path.join(root, "data", list_name)
        for number, (image_id, variant) in _read_lines(path, 2):
            if variant not in folder:
                raise DataError(f"{path} line {number}: variant {variant!r} is not among the {len(variants)} of "
                                "variants.txt")
            items.append(Item(split, folder[variant], os.path.join(root, "data", "images", f"{image_id}.jpg"),
                              f"{image_id}.jpg", crop))
    notes = ["train/ = trainval, val/ = test",
             f"banner (bottom {AIRCRAFT_BANNER_PX} px) " + ("cropped" if crop_banner else
                                                            "kept, as fast-MPN-COV uses the images")]
    plan = Plan(title, root, [folder[v] for v in variants], items, {"train": 6667, "val": 3333, "classes": 100}, notes)
    return _checked(plan, "variants.txt", "images_variant_*.txt")


def _mat_column(records, name, path):
    """One field of a MATLAB struct array as a list of Python values (loaded with squeeze_me=False)."""
    if records.dtype.names is None or name not in records.dtype.names:
        raise DataError(f"{path} has no field {name!r} (fields: {', '.join(records.dtype.names or ())})")
    return [np.asarray(r[name]).ravel()[0].item() if np.asarray(r[name]).size else None for r in records.ravel()]


def _load_mat(path, key):
    from scipy.io import loadmat
    try:
        value = loadmat(path)[key]
    except KeyError:
        raise DataError(f"{path} has no {key!r}: not the file of the published archive") from None
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DataError(f"{path} cannot be read as a MATLAB file ({exc})") from None
    return value


def read_cars(src, crop_banner=False):
    title = "Stanford Cars"
    root = _root(src, title, "stanford_cars", ["devkit", "cars_train", "cars_test"])
    test_annos = next((n for n in ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")
                       if os.path.isfile(os.path.join(root, n))), "cars_test_annos_withlabels.mat")
    _require(root, title, ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat", test_annos, "cars_train",
                           "cars_test"])
    meta = os.path.join(root, "devkit", "cars_meta.mat")
    names = [str(np.asarray(n).ravel()[0]) for n in _load_mat(meta, "class_names").ravel()]
    folders = [safe_folder_name(i + 1, n) for i, n in enumerate(names)]
    items = []
    for split, annos, images in (("train", "devkit/cars_train_annos.mat", "cars_train"),
                                 ("val", test_annos, "cars_test")):
        path = os.path.join(root, annos)
        records = _load_mat(path, "annotations")
        for fname, label in zip(_mat_column(records, "fname", path), _mat_column(records, "class", path)):
            if not 1 <= int(label) <= len(names):
                raise DataError(f"{path}: {fname} has class {label}, but cars_meta.mat lists {len(names)} classes")
            items.append(Item(split, folders[int(label) - 1], os.path.join(root, images, fname), fname))
    plan = Plan(title, root, folders, items, {"train": 8144, "val": 8041, "classes": 196},
                ["val/ is the official test split (labels of cars_test_annos_withlabels.mat)"])
    return _checked(plan, "cars_meta.mat", "the annotations")


def read_imagenet(src, crop_banner=False):
    title = "ImageNet (ILSVRC2012) validation"
    truth_rel = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    meta_rel = "ILSVRC2012_devkit_t12/data/meta.mat"
    root = os.path.abspath(src)
    if not any(os.path.exists(os.path.join(root, e)) for e in ("ILSVRC2012_img_val", "ILSVRC2012_devkit_t12")):
        raise DataError(f"{src} is not an ImageNet archive folder: it holds neither ILSVRC2012_img_val/ nor "
                        "ILSVRC2012_devkit_t12/ (extract ILSVRC2012_img_val.tar into ILSVRC2012_img_val/ and "
                        "ILSVRC2012_devkit_t12.tar.gz beside it)")
    _require(root, title, ["ILSVRC2012_img_val", truth_rel, meta_rel])
    synsets = _load_mat(os.path.join(root, meta_rel), "synsets")
    ids = _mat_column(synsets, "ILSVRC2012_ID", meta_rel)
    wnids = _mat_column(synsets, "WNID", meta_rel)
    children = _mat_column(synsets, "num_children", meta_rel)
    leaves = {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}
    items = []
    with open(os.path.join(root, truth_rel), encoding="utf-8") as f:
        truth = [line.strip() for line in f if line.strip()]
    for number, text in enumerate(truth, 1):
        if not text.isdigit() or int(text) not in leaves:
            raise DataError(f"{truth_rel} line {number}: {text!r} is not the ILSVRC2012_ID of one of meta.mat's "
                            f"{len(leaves)} classes")
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        items.append(Item("val", leaves[int(text)], os.path.join(root, "ILSVRC2012_img_val", name), name))
    plan = Plan(title, root, sorted(leaves.values()), items, {"val": 50000, "classes": 1000},
                ["val/<wnid>/ as train/ has them (class order: sorted wnids, as torchvision)"])
    return _checked(plan, "meta.mat", truth_rel)


def _checked(plan, class_list, image_list):
    """Every class of the class list has images in each split written; every listed image exists."""
    for split in sorted({it.split for it in plan.items}):
        used = {it.cls for it in plan.items if it.split == split}
        if len(used) != len(plan.classes):
            empty = [c for c in plan.classes if c not in used]
            raise DataError(f"{class_list} lists {len(plan.classes)} classes but {image_list} gives {split} images "
                            f"of {len(used)} (none of {empty[0]}{' ...' if len(empty) > 1 else ''}): "
                            "the class list does not match the images")
    absent = [it.src for it in plan.items if not os.path.isfile(it.src)]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise DataError(f"{absent[0]}{more}, named in {image_list}, absent: the archive is incomplete "
                        "(extract it again)")
    return plan


READERS = {"cub200": read_cub, "aircraft": read_aircraft, "cars": read_cars, "imagenet": read_imagenet}
