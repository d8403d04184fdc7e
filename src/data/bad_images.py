"""Undecodable images: keep training, and say which files they were, once each.

Every file is checked once per run, before the decoder ever sees it (``check_files``, at start-up,
split among the ranks): a few byte lookups at its head and tail. Files that fail are left out of
the samplers' orders (src/data/order.py): bad_image_mode "replace" fills their places with other
samples, "skip" drops them, "error" stops the run at start naming the first. The pipeline then reads
files in MindSpore's C++ loader with no Python per file (a per-read hook under the GIL cost 14% of
the throughput at 2 workers).

Why refuse before the decoder: MindSpore 2.8's decoder kills the process (SIGFPE) on a JPEG cut between
its frame header and its scan, and writes a copy of any GIF/WebP into the working folder. The rare
file that passes the checks but still fails to decode (a corrupt PNG IDAT, say) is handled by
MindSpore's error-samples mode, set from bad_image_mode (``set_bad_image_mode``); ``pipeline_errors``
turns its error into one line naming the file.

``find_unreadable_images`` (scripts/check_dataset.py) applies the same checks plus a full Pillow decode:
slower, and it also finds those rare files.
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from src.errors import DataError, first_line

from .folder import FileList

# Pillow format names that MindSpore's Decode reads (MPO is a camera JPEG).
MINDSPORE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF")
# Their signatures, and the bytes at the end searched for an end marker (some writers pad after it).
_SIGNATURES = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
TAIL = 4096
HEAD = 65536  # read first; a JPEG whose markers run past it (large EXIF/ICC) is read whole

# Reason codes: check_files returns indices into REASONS (0: fine), which ranks can add up.
REASONS = ("", "empty file (0 bytes)", "not a JPEG, PNG, BMP or TIFF image",
           "JPEG ends before its image data (truncated)", "JPEG has no end marker (truncated)",
           "PNG has no IEND chunk (truncated)", "BMP is shorter than its header says (truncated)", "cannot be read")
_MORE = object()  # the JPEG walk needs bytes beyond the head
_MODES = {"replace": "REPLACE", "skip": "SKIP", "error": "RETURN"}
_DONE = {"replace": "replaced", "skip": "skipped"}  # what happens to a refused file, for the log


def set_bad_image_mode(mode):
    """Apply cfg.bad_image_mode ("replace" | "skip" | "error") to MindSpore's dataset config, which
    decides the fate of a file that passed the checks but fails to decode. Global to the process."""
    import mindspore.dataset as ds
    if mode not in _MODES:
        raise ValueError(f"bad_image_mode must be one of {list(_MODES)}, got '{mode}'")
    ds.config.set_error_samples_mode(getattr(ds.config.ErrorSamplesMode, _MODES[mode]))


def _problem(head, tail, size):
    """The reason (a REASONS entry) for a file of ``size`` bytes starting with ``head`` and ending
    with ``tail``, None if the decoder may read it, or _MORE if the JPEG walk needs more of the head."""
    if not size:
        return REASONS[1]
    if not any(bytes(head[:8]).startswith(sig) for sig in _SIGNATURES):
        return REASONS[2]
    if head[:2] == b"\xff\xd8":
        header = _jpeg_header_problem(head, size)
        return header or (None if b"\xff\xd9" in tail else REASONS[4])
    if head[:4] == b"\x89PNG" and b"IEND" not in tail:
        return REASONS[5]
    if head[:2] == b"BM" and size < int.from_bytes(bytes(head[2:6]), "little"):
        return REASONS[6]
    return None


def image_problem(data):
    """None if MindSpore's decoder may be given these encoded bytes, else a short reason.

    A few byte lookups: the signature, a JPEG's markers up to its scan and its end marker (cut in
    the scan data, the decoder may fill grey or fail), a PNG's IEND chunk, a BMP's declared size.
    """
    buf = bytes(data)
    return _problem(buf, buf[-TAIL:], len(buf))


def file_problem(path):
    """image_problem of the file at ``path``, reading only its head and tail (the whole file only
    when a JPEG's markers run past HEAD bytes); "cannot be read" for a file that cannot be opened."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD)
            size = os.fstat(f.fileno()).st_size
            if size <= HEAD:
                return image_problem(head)
            f.seek(size - TAIL)
            reason = _problem(head, f.read(), size)
            if reason is _MORE:
                f.seek(0)
                reason = image_problem(f.read())
    except OSError:
        return REASONS[7]
    return reason


def _jpeg_header_problem(buf, size):
    i, n = 2, len(buf)
    while True:
        if i + 4 > n:
            return _MORE if n < size else REASONS[3]
        if buf[i] != 0xFF:
            return None  # not a marker: let the decoder judge
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan: the decoder copes with a cut from here on
            return None
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + (buf[i + 2] << 8 | buf[i + 3])


def check_files(paths, part=(0, 1)):
    """int32 reason codes (indices into REASONS, 0 = fine) of paths[k::n] for part (k, n), zeros
    elsewhere: each rank checks its part and a sum over ranks gives every rank all codes. One Python
    thread (threads would fight over the GIL: two took 3x longer per file than one)."""
    k, n = part
    codes = np.zeros(len(paths), np.int32)
    for i in range(k, len(paths), n):
        reason = file_problem(paths[i])
        if reason is not None:
            codes[i] = REASONS.index(reason)
    return codes


def bad_files(files, codes):
    """{index: reason} of a FileList's files whose code is not 0, from check_files (summed over ranks)."""
    return {int(i): REASONS[int(codes[i])] for i in np.flatnonzero(np.asarray(codes))}


def check_lists(lists, part=(0, 1)):
    """check_files of this rank's part of every FileList in ``lists``, concatenated (one array for
    one sum over ranks)."""
    return np.concatenate([check_files(f.paths, part) for f in lists] + [np.zeros(0, np.int32)])


def split_verdicts(lists, codes):
    """[{index: reason}] per FileList of ``lists`` from check_lists' codes summed over all ranks."""
    pieces = np.split(np.asarray(codes).astype(np.int32), np.cumsum([len(f) for f in lists])[:-1])
    return [bad_files(f, c) for f, c in zip(lists, pieces)]


def bad_image_lines(files, bad, mode):
    """Log lines naming each refused file once, and what bad_image_mode does with them. For
    bad_image_mode=error with bad files: raises DataError naming the first (and how many more)."""
    if not bad:
        return []
    first = min(bad)
    if mode == "error":
        more = f"; {len(bad) - 1} more: python scripts/check_dataset.py lists them" if len(bad) > 1 else ""
        raise DataError(f"undecodable image {files.paths[first]}: {bad[first]} (bad_image_mode=error{more})")
    what = {"replace": "replaced by other samples", "skip": "left out"}[mode]
    lines = [f"undecodable image ({_DONE[mode]}): {files.paths[i]} ({bad[i]})" for i in sorted(bad)]
    lines.append(f"{files.split_dir}: {len(bad)} undecodable image(s) found by the start-up check, {what} "
                 "in every epoch; list them all with: python scripts/check_dataset.py DATA_PATH")
    return lines


class BadImageMonitor:
    """The trainer's per-epoch reminder of the training files the start-up check refused (named once,
    by bad_image_lines): ``epoch_lines(epoch, mode)`` gives the line for the end of each epoch."""

    def __init__(self, count):
        self.count = int(count)

    def epoch_lines(self, epoch, mode="replace"):
        if not self.count:
            return []
        return [f"epoch {epoch}: {self.count} undecodable image(s) {_DONE[mode]}; list them all with: "
                "python scripts/check_dataset.py DATA_PATH"]


@contextlib.contextmanager
def pipeline_errors():
    """Around a pipeline's iteration: MindSpore's RuntimeError for a file that passed the checks but
    failed to decode (bad_image_mode=error stops there) becomes a DataError naming the file (one line
    at the CLI); any other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        key = "The corresponding data file is: "
        if key not in text:
            raise
        line = next(l for l in text.splitlines() if key in l)
        path, _, why = line.split(key, 1)[1].partition(". ")
        raise DataError(f"undecodable image {path}: {why.strip() or 'the decoder failed'} "
                        "(bad_image_mode=error)") from None


def list_image_files(path, splits=("train", "val")):
    """The files the pipelines read: <path>/<split>/<class>/* for the ``splits`` that exist, else
    <path>/<class>/* (class folders' own files with an image extension; not further down)."""
    roots = [os.path.join(path, s) for s in splits if os.path.isdir(os.path.join(path, s))]
    return [p for root in roots or [path] for p in FileList(root, _classes(root)).paths]


def _classes(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def check_image(path):
    """None if the pipeline's checks pass and Pillow fully decodes the file, else a short reason."""
    from PIL import Image
    reason = None
    try:
        with open(path, "rb") as f:
            reason = image_problem(f.read())
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt not in MINDSPORE_FORMATS:
            return f"{fmt} image: MindSpore decodes only JPEG, PNG, BMP and TIFF"
        if reason is None:
            with Image.open(path) as im:
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # unidentified: OSError
        return reason or f"corrupt or truncated: {first_line(e)}"
    return reason


def find_unreadable_images(path, num_workers=None, progress=None, splits=("train", "val")):
    """[(file, reason)] for every image under path that cannot be decoded (sorted by file).

    path: a data_path (with the ``splits`` folders) or a split folder of class folders.
    progress: optional callable(done, total), called every 1000 files.
    """
    if not os.path.isdir(path):
        raise DataError(f"dataset folder not found: {path}")
    files = sorted(list_image_files(path, splits))
    workers = num_workers or min(8, os.cpu_count() or 1)
    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
        for i, (f, reason) in enumerate(zip(files, pool.map(check_image, files, chunksize=64)), 1):
            if reason is not None:
                bad.append((f, reason))
            if progress is not None and (i % 1000 == 0 or i == len(files)):
                progress(i, len(files))
    return bad
