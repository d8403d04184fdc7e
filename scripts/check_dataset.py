"""List every image of a dataset that cannot be decoded, before a long run meets it.

    python scripts/check_dataset.py DATA_PATH [--workers N] [--train_split train] [--val_split val]

DATA_PATH holds the train and val split folders (train/ and val/ unless --train_split / --val_split
name others, as the configs' keys of the same names do), or is itself a folder of class folders. Every image file that
training reads (extensions .jpg .jpeg .png .bmp .tif .tiff, any case, directly in a class folder)
goes through the pipeline's own checks and a full Pillow decode; files that fail, and files in a
format MindSpore cannot decode (GIF, WebP renamed to .jpg), are printed one per line as "PATH: reason".
Files that training never reads (other extensions such as .gif/.webp, files in sub-folders of class
folders) are counted per kind and class. The class folders are checked too (missing, empty,
train/val mismatch).
Exit status: 0 all readable, 1 unreadable files or folder problems found, 2 bad usage.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.data import (DatasetError, check_class_match, describe_unread_files, find_unreadable_images,  # noqa: E402
                      scan_image_folder, unread_files)


def check_folders(path, split_names=("train", "val")):
    """Structural problems of the train/val class folders, as messages."""
    splits = [s for s in split_names if os.path.isdir(os.path.join(path, s))]
    problems, classes = [], {}
    for s in splits or [None]:
        d = os.path.join(path, s) if s else path
        try:
            classes[s] = scan_image_folder(d)
        except DatasetError as e:
            problems.append(str(e))
    train, val = split_names
    if train in classes and val in classes:
        try:
            check_class_match(classes[train], classes[val], train, val)
        except DatasetError as e:
            problems.append(str(e))
    return problems, classes


def main(argv=None):
    parser = argparse.ArgumentParser(description="List unreadable images of an ImageNet-style dataset.")
    parser.add_argument("data_path", help="folder with train/ and val/, or a folder of class folders")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPUs, at most 8)")
    parser.add_argument("--train_split", default=None, help="training folder under DATA_PATH (default: train)")
    parser.add_argument("--val_split", default=None, help="validation folder under DATA_PATH (default: val)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data_path):
        print(f"error: dataset folder not found: {args.data_path}", file=sys.stderr)
        return 2
    splits = (args.train_split or "train", args.val_split or "val")
    for key in ("train_split", "val_split"):
        name = getattr(args, key)
        if name is not None and not os.path.isdir(os.path.join(args.data_path, name)):
            print(f"error: dataset folder not found: {os.path.join(args.data_path, name)} (--{key}={name})",
                  file=sys.stderr)
            return 2
    problems, classes = check_folders(args.data_path, splits)
    unread = 0
    for p in problems:
        print(f"folder problem: {p}")
    for split, names in classes.items():
        print(f"{split or args.data_path}: {len(names)} classes")
        split_dir = os.path.join(args.data_path, split) if split else args.data_path
        unread += sum(sum(per_class.values()) for per_class in unread_files(split_dir).values())
        for line in describe_unread_files(split_dir):
            print(line)
    start = time.time()
    seen = [0]
    tty = sys.stderr.isatty()

    def progress(done, total):
        seen[0] = total
        if tty:
            print(f"\rchecked {done}/{total} images", end="", file=sys.stderr, flush=True)
    bad = find_unreadable_images(args.data_path, num_workers=args.workers, progress=progress, splits=splits)
    if tty and seen[0]:
        print(file=sys.stderr)
    for path, reason in bad:
        print(f"{path}: {reason}")
    note = f" ({unread} other file(s) not read, listed above)" if unread else ""
    print(f"{len(bad)} unreadable of {seen[0]} image(s){note}, checked in {time.time() - start:.1f} s")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
