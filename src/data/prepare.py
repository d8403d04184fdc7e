"""Write a dataset's published archive as train/ and val/ class folders (scripts/prepare_dataset.py).

The archive's lists decide every image's split and class (src/data/archives.py). Files are hard
links where the file system allows (no extra space; the archive's files stay untouched), else
symbolic links (``--link auto``); ``--link copy`` makes an independent copy. Aircraft images with
their banner cropped are always new files (JPEG, quality 95).

Idempotent: a finished destination holds ``.prepare_dataset.json``; a second run that finds it, with
every file in place, writes nothing and says so. An interrupted run is completed by running again
(files are written under a temporary name, then renamed).
"""
import errno
import json
import os
import shutil

from src.data.archives import READERS
from src.errors import DataError

MARKER = ".prepare_dataset.json"
LINK_MODES = ("auto", "hardlink", "symlink", "copy")
# Hard links fail across file systems (EXDEV) or where the file system has none (EPERM, ENOTSUP, EMLINK).
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES}


def _same_file(dst, src, mode):
    """True when ``dst`` already is what this run would write for ``src``."""
    if os.path.islink(dst):
        return os.readlink(dst) == src
    if mode == "copy" or not os.path.isfile(src):
        return os.path.getsize(dst) == os.path.getsize(src)
    return os.path.samefile(dst, src) or os.path.getsize(dst) == os.path.getsize(src)


class _Writer:
    """Writes one file at a time; ``auto`` falls back from hard links to symbolic links once."""

    def __init__(self, mode):
        self.mode = "hardlink" if mode == "auto" else mode
        self.auto = mode == "auto"
        self.fallback = ""

    def write(self, item, dst):
        tmp = os.path.join(os.path.dirname(dst), f".tmp{os.getpid()}.{item.name}")
        if os.path.lexists(tmp):
            os.remove(tmp)
        if item.crop_bottom:
            _crop(item.src, tmp, item.crop_bottom)
        elif self.mode == "hardlink":
            try:
                os.link(item.src, tmp)
            except OSError as exc:
                if not self.auto or exc.errno not in _NO_HARDLINK:
                    raise DataError(f"cannot hard-link {item.src} to {dst} ({exc.strerror}): use --link symlink "
                                    "or --link copy") from None
                self.mode, self.fallback = "symlink", f"hard links impossible here ({exc.strerror}): symbolic links"
                return self.write(item, dst)
        elif self.mode == "symlink":
            os.symlink(item.src, tmp)
        else:
            shutil.copyfile(item.src, tmp)
        os.replace(tmp, dst)


def _crop(src, dst, rows):
    from PIL import Image
    with Image.open(src) as im:
        width, height = im.size
        if height <= rows:
            raise DataError(f"{src} is {height} pixels high: no banner of {rows} rows to crop")
        im.crop((0, 0, width, height - rows)).save(dst, format="JPEG", quality=95)


def _strays(dst, plan, splits):
    """Files in the destination's split folders that the plan does not write."""
    wanted = {(it.split, it.cls, it.name) for it in plan.items}
    out = []
    for split in splits:
        top = os.path.join(dst, split)
        for folder, _, files in os.walk(top) if os.path.isdir(top) else ():
            cls = os.path.relpath(folder, top)
            out += [os.path.join(folder, f) for f in files
                    if not f.startswith(".tmp") and (split, cls, f) not in wanted]
    return out


def _check_train_classes(dst, plan):
    """ImageNet: val/'s wnids must be train/'s (when the destination already has train/)."""
    train = os.path.join(dst, "train")
    if not os.path.isdir(train):
        plan.notes.append(f"no {train} yet: put the training class folders (n01440764/ ...) there")
        return
    have = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)) and not d.startswith("."))
    if have != plan.classes:
        odd = sorted(set(have) ^ set(plan.classes))
        raise DataError(f"{train} has {len(have)} class folders but the devkit has {len(plan.classes)} classes "
                        f"({len(odd)} differ, e.g. {odd[0]}): the class count does not match")


def prepare(dataset, src, dst, link="auto", crop_banner=False, log=print):
    """Write ``dataset`` (a READERS key) from the archive folder ``src`` into ``dst``/train and /val.
    Returns the summary lines (also passed to ``log``)."""
    if not os.path.isdir(src):
        raise DataError(f"--src {src} is not a folder (extract the archive and pass its folder)")
    plan = READERS[dataset](src, crop_banner=crop_banner)
    dst = os.path.abspath(dst)
    splits = [s for s in ("train", "val") if any(it.split == s for it in plan.items)]
    if dataset == "imagenet":
        _check_train_classes(dst, plan)
    options = {"dataset": dataset, "source": plan.root, "crop_banner": bool(crop_banner)}
    marker = os.path.join(dst, MARKER)
    done = None
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
    if done is not None and {k: done.get(k) for k in options} != options:
        raise DataError(f"{dst} was prepared with other settings ({', '.join(f'{k}={done.get(k)}' for k in options)}): "
                        "choose another --dst")
    strays = _strays(dst, plan, splits)
    if strays:
        raise DataError(f"{dst} holds {len(strays)} file(s) that the {plan.title} lists do not name "
                        f"(e.g. {strays[0]}): choose an empty --dst")
    writer, written, kept = _Writer(link), 0, 0
    for item in plan.items:
        folder = os.path.join(dst, item.split, item.cls)
        target = os.path.join(folder, item.name)
        if os.path.lexists(target):
            if not item.crop_bottom and not _same_file(target, item.src, writer.mode):
                raise DataError(f"{target} exists and is not {item.src}: choose an empty --dst")
            kept += 1
            continue
        os.makedirs(folder, exist_ok=True)
        writer.write(item, target)
        written += 1
    how = "cropped JPEG copies" if crop_banner else (writer.fallback or
                                                      {"hardlink": "hard links", "symlink": "symbolic links",
                                                       "copy": "copies"}[writer.mode])
    if written == 0 and done is not None:
        lines = [f"nothing to do: {dst} already holds {plan.title} from {plan.root} (written by an earlier run)"]
    else:
        lines = [f"{plan.title}: {plan.root} -> {dst}, {written} file(s) written ({how})"
                 + (f", {kept} already there" if kept else "")]
    for split in splits:
        classes = len({it.cls for it in plan.items if it.split == split})
        lines.append(f"  {split}/ {plan.count(split):,} images, {classes} classes")
    pub = plan.published
    counts = {s: plan.count(s) for s in splits}
    same = all(counts.get(s) == pub[s] for s in splits) and len(plan.classes) == pub["classes"]
    published = ", ".join(f"{s} {pub[s]:,}" for s in splits) + f", {pub['classes']} classes"
    lines.append(f"  as published ({published})" if same else f"  the published dataset has {published}: "
                 "this archive is a different or partial one")
    lines += [f"  {note}" for note in plan.notes]
    if written or done is None:
        with open(marker + ".tmp", "w") as f:
            json.dump(dict(options, counts=counts, classes=len(plan.classes), files=how), f, indent=1)
        os.replace(marker + ".tmp", marker)
    for line in lines:
        log(line)
    return lines
