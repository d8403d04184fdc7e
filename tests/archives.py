"""Small archives in each dataset's exact published layout, with real JPEGs, for the tests of
scripts/prepare_dataset.py. Every builder returns {(split, class folder, file name): source path}: where
each image must land, known from how the archive was built (not from its list files)."""
import os

import numpy as np
from PIL import Image
from scipy.io import savemat

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
AIRCRAFT_VARIANTS = ["707-320", "F-16A/B", "Falcon 2000"]      # real names: with "/" and a space
CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
IMAGENET_LEAVES = [(1, "n02119789", "kit fox, Vulpes macrotis"), (2, "n02100735", "English setter"),
                   (3, "n02110185", "Siberian husky")]  # ILSVRC2012_IDs 1-3 of the real meta.mat


def _jpeg(path, rng, size=(24, 20), banner=0):
    """A unique noisy JPEG of ``size`` (w, h); ``banner`` rows at the bottom in flat white."""
    w, h = size
    img = rng.integers(0, 200, (h, w, 3)).astype(np.uint8)
    if banner:
        img[h - banner:] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def make_cub(root, train=3, test=2, seed=0):
    """CUB_200_2011.tgz extracted in ``root``: ids numbered through the classes in folder order."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "CUB_200_2011")
    lines = {n: [] for n in ("images", "train_test_split", "image_class_labels", "classes", "bounding_boxes")}
    where, image_id = {}, 0
    for c, name in enumerate(CUB_CLASSES, 1):
        lines["classes"].append(f"{c} {name}")
        for i in range(train + test):
            image_id += 1
            file = f"{name.split('.', 1)[1]}_{i:04d}_{image_id}.jpg"
            _jpeg(os.path.join(base, "images", name, file), rng)
            lines["images"].append(f"{image_id} {name}/{file}")
            lines["train_test_split"].append(f"{image_id} {1 if i % 2 == 0 and i < 2 * train else 0}")
            lines["image_class_labels"].append(f"{image_id} {c}")
            lines["bounding_boxes"].append(f"{image_id} 1.0 2.0 10.0 12.0")
            split = "train" if lines["train_test_split"][-1].endswith(" 1") else "val"
            where[(split, name, file)] = os.path.join(base, "images", name, file)
    for n, rows in lines.items():
        with open(os.path.join(base, f"{n}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")
    open(os.path.join(root, "attributes.txt"), "w").write("1 has_bill_shape::curved\n")
    return where


def make_aircraft(root, trainval=2, test=2, seed=0, size=(30, 44)):
    """fgvc-aircraft-2013b.tar.gz extracted in ``root``; images carry a 20-row white banner."""
    rng = np.random.default_rng(seed)
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(data, "images"))
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("\n".join(AIRCRAFT_VARIANTS) + "\n")
    rows = {"trainval": [], "test": [], "train": [], "val": []}
    where, image_id = {}, 1025794
    for c, variant in enumerate(AIRCRAFT_VARIANTS, 1):
        for i in range(trainval + test):
            image_id += 7
            split = "trainval" if i < trainval else "test"
            _jpeg(os.path.join(data, "images", f"{image_id:07d}.jpg"), rng, size, banner=20)
            rows[split].append(f"{image_id:07d} {variant}")
            if split == "trainval":
                rows["train" if i == 0 else "val"].append(f"{image_id:07d} {variant}")
            folder = f"{c:03d}.{variant.replace('/', '_')}"
            where[("train" if split == "trainval" else "val", folder, f"{image_id:07d}.jpg")] = \
                os.path.join(data, "images", f"{image_id:07d}.jpg")
    for split, lines in rows.items():
        with open(os.path.join(data, f"images_variant_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return where


def _cars_annotations(records, labelled=True):
    """A 1xN MATLAB struct array as the devkit's: bbox_x1..y2 (uint16), class (uint8, 1-based), fname;
    without class for the unlabelled cars_test_annos.mat."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if labelled else []) + ["fname"]
    out = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, (cls, fname) in enumerate(records):
        out[0, i] = tuple(np.array([[v]], np.uint16) for v in (1, 2, 20, 16)) + \
            ((np.array([[cls]], np.uint8),) if labelled else ()) + (np.array([fname]),)
    return out


def make_cars(root, train=2, test=2, seed=0):
    """cars_train.tgz, cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat in ``root``.
    Both splits number their files from 00001.jpg, as the published ones; classes interleave."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "devkit"))
    names = np.empty((1, len(CARS_CLASSES)), dtype=object)
    for i, n in enumerate(CARS_CLASSES):
        names[0, i] = np.array([n])
    savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": names})
    where = {}
    for split, folder, count, annos in (("train", "cars_train", train, "devkit/cars_train_annos.mat"),
                                        ("val", "cars_test", test, "cars_test_annos_withlabels.mat")):
        records = []
        for k in range(count * len(CARS_CLASSES)):
            cls, fname = k % len(CARS_CLASSES) + 1, f"{k + 1:05d}.jpg"
            _jpeg(os.path.join(root, folder, fname), rng)
            records.append((cls, fname))
            where[(split, f"{cls:03d}.{CARS_CLASSES[cls - 1].replace('/', '_')}", fname)] = \
                os.path.join(root, folder, fname)
        savemat(os.path.join(root, annos), {"annotations": _cars_annotations(records)})
    unlabelled = _cars_annotations([(0, f"{k + 1:05d}.jpg") for k in range(test * len(CARS_CLASSES))], False)
    savemat(os.path.join(root, "devkit", "cars_test_annos.mat"), {"annotations": unlabelled})
    return where


def make_imagenet_val(root, per_class=2, seed=0):
    """ILSVRC2012_img_val/ (all images in one folder) and ILSVRC2012_devkit_t12/data/: the ground truth
    (one ILSVRC2012_ID a line) and meta.mat, whose synsets also hold a non-leaf one, as the real 1860."""
    rng = np.random.default_rng(seed)
    data = os.path.join(root, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(IMAGENET_LEAVES) + 1, 1), dtype=[(f, "O") for f in fields])
    for i, (sid, wnid, words) in enumerate(IMAGENET_LEAVES + [(1001, "n02075296", "carnivore")]):
        leaf = sid <= 1000
        synsets[i, 0] = (np.array([[sid]], np.uint16), np.array([wnid]), np.array([words]), np.array(["..."]),
                         np.array([[0 if leaf else 3]], np.uint8),
                         np.zeros((1, 0), np.uint8) if leaf else np.array([[1, 2, 3]], np.uint16),
                         np.array([[0 if leaf else 2]], np.uint8), np.array([[1300 if leaf else 0]], np.uint16))
    savemat(os.path.join(data, "meta.mat"), {"synsets": synsets})
    order = [sid for sid, _, _ in IMAGENET_LEAVES] * per_class
    rng.shuffle(order)
    where = {}
    for n, sid in enumerate(order, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        _jpeg(os.path.join(root, "ILSVRC2012_img_val", name), rng)
        where[("val", IMAGENET_LEAVES[sid - 1][1], name)] = os.path.join(root, "ILSVRC2012_img_val", name)
    with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.write("".join(f"{sid}\n" for sid in order))
    return where
