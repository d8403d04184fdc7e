"""Undecodable images: keep training, and say which files they were, once each.

The pipelines read every file through ``read_image``, ImageFolderDataset's ``decrypt`` hook: MindSpore
calls it with the file's path from its C++ loader threads, in the process that iterates the pipeline
(map workers, threads or processes, never run it), so the records are the trainer's to read. Only
MindSpore's opt-in MS_INDEPENDENT_DATASET=True mode would move it elsewhere. A file MindSpore's decoder
must not see (empty, not an image, a GIF/WebP renamed .jpg, a JPEG/PNG/BMP cut short) is recorded
with its reason and handed on as an empty buffer; the decoder then fails on that sample and
cfg.bad_image_mode decides: replace it by another sample, skip it, or stop (the error names the file).
``BadImageMonitor`` gives the trainer each recorded file once per run and a count per epoch.

Why refuse before the decoder: MindSpore 2.8's decoder kills the process (SIGFPE) on a JPEG cut between
its frame header and its scan, and writes a copy of any GIF/WebP into the working folder.

``find_unreadable_images`` (scripts/check_dataset.py) applies the same checks plus a full Pillow decode:
slower, and it also finds the rare file that passes the checks but still fails to decode (training
replaces those too; only MindSpore's own WARNING log lines name them).
"""
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from src.errors import DataError, first_line

from .folder import is_image_file

# Pillow format names that MindSpore's Decode reads (MPO is a camera JPEG).
MINDSPORE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF")
# Their signatures, and the bytes at the end searched for an end marker (some writers pad after it).
_SIGNATURES = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")
TAIL = 4096

_MODES = {"replace": "REPLACE", "skip": "SKIP", "error": "RETURN"}
# refused: reads handed on empty since the process started; stop: the DataError of bad_image_mode=error
_state = {"mode": "replace", "refused": 0, "stop": None}
_bad = {}                                   # path -> reason, in the order first met
_lock = threading.Lock()


def set_bad_image_mode(mode):
    """Apply cfg.bad_image_mode ("replace" | "skip" | "error") to MindSpore's dataset config.

    replace: an undecodable sample is replaced by another one (shards keep equal sizes, which
    distributed training needs); skip: dropped (an epoch may then have fewer batches than
    get_dataset_size() said); error: the pipeline stops naming the file and the reason.
    Global to the process: it applies to every pipeline launched afterwards.
    """
    import mindspore.dataset as ds
    if mode not in _MODES:
        raise ValueError(f"bad_image_mode must be one of {list(_MODES)}, got '{mode}'")
    ds.config.set_error_samples_mode(getattr(ds.config.ErrorSamplesMode, _MODES[mode]))
    _state["mode"] = mode


def image_problem(data):
    """None if MindSpore's decoder may be given these encoded bytes, else a short reason.

    A few byte lookups: the signature, a JPEG's markers up to its scan and its end marker (cut in
    the scan data, the decoder may fill grey or fail), a PNG's IEND chunk, a BMP's declared size.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    head, tail = bytes(buf[:8]), bytes(buf[-TAIL:])
    if not len(buf):
        return "empty file (0 bytes)"
    if not any(head.startswith(sig) for sig in _SIGNATURES):
        return "not a JPEG, PNG, BMP or TIFF image"
    if head.startswith(b"\xff\xd8"):
        return _jpeg_header_problem(buf) or (None if b"\xff\xd9" in tail else "JPEG has no end marker (truncated)")
    if head.startswith(b"\x89PNG") and b"IEND" not in tail:
        return "PNG has no IEND chunk (truncated)"
    if head.startswith(b"BM") and len(buf) < int.from_bytes(bytes(buf[2:6]), "little"):
        return "BMP is shorter than its header says (truncated)"
    return None


def _jpeg_header_problem(buf):
    i, n = 2, len(buf)
    while True:
        if i + 4 > n:
            return "JPEG ends before its image data (truncated)"
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


def read_image(path):
    """ImageFolderDataset's ``decrypt`` hook: the file's bytes, or b"" (recorded) for a bad file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        reason = image_problem(data)
    except OSError as exc:  # vanished, no permission: one bad sample, not a stopped run
        reason = f"cannot read ({exc.strerror})"
    if reason is None:
        return data
    if _state["mode"] == "error":  # MindSpore stops the pipeline with this message inside its own
        _state["stop"] = DataError(f"undecodable image {path}: {reason} (bad_image_mode=error)")
        raise _state["stop"]
    with _lock:
        _state["refused"] += 1
        _bad.setdefault(path, reason)
    return b""


@contextlib.contextmanager
def pipeline_errors():
    """Around a pipeline's iteration: MindSpore's RuntimeError for a pipeline that bad_image_mode=error
    stopped becomes read_image's DataError (one line at the CLI); any other error passes unchanged."""
    _state["stop"] = None
    try:
        yield
    except RuntimeError:
        stop, _state["stop"] = _state["stop"], None
        if stop is None:
            raise
        raise stop from None


class BadImageMonitor:
    """The trainer's report of refused files::

        monitor = BadImageMonitor().start()
        per epoch, after its last batch: count, new_paths = monitor.collect()
        monitor.stop()

    ``epoch_lines(epoch, mode)`` formats the same report as log lines. Every pipeline of the
    process feeds it (train and val): call collect() after evaluation to include val files.
    """

    def __init__(self):
        self._seen_refused = 0
        self._reported = set()

    def start(self):
        with _lock:
            self._seen_refused = _state["refused"]
        return self

    def stop(self):
        """Nothing to release (kept so callers need not know)."""

    def collect(self):
        """(count, new_paths): reads refused since start() or the previous call, and the files
        among all refused so far not returned before (each file is returned once per monitor)."""
        with _lock:
            count, self._seen_refused = _state["refused"] - self._seen_refused, _state["refused"]
            new = [p for p in _bad if p not in self._reported]
        self._reported.update(new)
        return count, new

    @staticmethod
    def reason(path):
        return _bad.get(path)

    def epoch_lines(self, epoch, mode="replace"):
        """Warning lines: one per newly met file (path and reason), then the epoch's count."""
        count, new = self.collect()
        lines = [f"undecodable image ({mode}d): {p} ({_bad[p]})" for p in new]
        if count:
            lines.append(f"epoch {epoch}: {count} undecodable image(s) {mode}d; "
                         "list them all with: python scripts/check_dataset.py DATA_PATH")
        return lines


def list_image_files(path):
    """The files ImageFolderDataset reads: <path>/{train,val}/<class>/* if those splits exist, else
    <path>/<class>/* (class folders' own files with an image extension; it does not descend further)."""
    splits = [os.path.join(path, s) for s in ("train", "val") if os.path.isdir(os.path.join(path, s))]
    files = []
    for root in splits or [path]:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        for c in classes:
            with os.scandir(os.path.join(root, c)) as it:
                files.extend(sorted(e.path for e in it if e.is_file() and is_image_file(e.name)))
    return files


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


def find_unreadable_images(path, num_workers=None, progress=None):
    """[(file, reason)] for every image under path that cannot be decoded (sorted by file).

    path: a data_path (with train/ and val/) or a split folder of class folders.
    progress: optional callable(done, total), called every 1000 files.
    """
    if not os.path.isdir(path):
        raise DataError(f"dataset folder not found: {path}")
    files = list_image_files(path)
    workers = num_workers or min(8, os.cpu_count() or 1)
    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
        for i, (f, reason) in enumerate(zip(files, pool.map(check_image, files, chunksize=64)), 1):
            if reason is not None:
                bad.append((f, reason))
            if progress is not None and (i % 1000 == 0 or i == len(files)):
                progress(i, len(files))
    return bad
