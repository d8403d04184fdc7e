"""Undecodable images: keep training, and say which files they were.

Two complementary tools:

* ``find_unreadable_images(path)`` opens every image with Pillow (verify, then a full decode) and
  lists the files that fail, plus files in a format MindSpore's decoder refuses (GIF, WebP, ...
  renamed to .jpg). Thorough but slow on a large dataset (``scripts/check_dataset.py``).
* ``BadImageMonitor`` catches, during training, the warning MindSpore's pipeline prints for each
  sample it replaced or skipped (``ErrorSamplesMode``): it reads the process's stderr through a
  pipe, records the file named in the warning, shows each bad file once instead of once per epoch,
  and hands the trainer a count per epoch. MindSpore prints these warnings only at log level
  WARNING for its dataset module ("MD"): GLOG_v <= 2, or MS_SUBMODULE_LOG_v="{MD:2}" in the
  environment before mindspore is imported (see ``DATASET_WARNINGS_ENV``).

MindSpore behaviour to know: a GIF or WebP file among the images makes its decoder write a copy
named ./unsupported_image.<ext> into the working directory (it cannot be switched off); run
check_dataset.py first to find such files.
"""
import atexit
import fcntl
import os
import re
import select
import struct
import sys
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .folder import is_image_file

# Set before importing mindspore so its dataset warnings (which name bad files) are printed even
# when GLOG_v=3 silences everything else: os.environ.setdefault(*DATASET_WARNINGS_ENV).
DATASET_WARNINGS_ENV = ("MS_SUBMODULE_LOG_v", "{MD:2}")

# Pillow format names that MindSpore's Decode reads (MPO is a camera JPEG).
MINDSPORE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF")

_MODES = {"replace": "REPLACE", "skip": "SKIP", "error": "RETURN"}


def set_bad_image_mode(mode):
    """Apply cfg.bad_image_mode ("replace" | "skip" | "error") to MindSpore's dataset config.

    replace: an undecodable sample is replaced by another one (shards keep equal sizes, which
    distributed training needs); skip: dropped (an epoch may then have fewer batches than
    get_dataset_size() said); error: the pipeline stops with the file's path.
    Global to the process: it applies to every pipeline launched afterwards.
    """
    import mindspore.dataset as ds
    if mode not in _MODES:
        raise ValueError(f"bad_image_mode must be one of {list(_MODES)}, got '{mode}'")
    ds.config.set_error_samples_mode(getattr(ds.config.ErrorSamplesMode, _MODES[mode]))


def list_image_files(path):
    """Image files under path: <path>/{train,val}/<class>/* if those exist, else <path>/<class>/*."""
    splits = [os.path.join(path, s) for s in ("train", "val") if os.path.isdir(os.path.join(path, s))]
    roots = splits or [path]
    files = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if dirpath == root:
                continue  # files directly in a split folder are not part of any class
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files


def check_image(path):
    """None if Pillow fully decodes the file in a format MindSpore reads, else a short reason."""
    from PIL import Image, UnidentifiedImageError
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt not in MINDSPORE_FORMATS:
            return f"{fmt} image: MindSpore decodes only JPEG, PNG, BMP and TIFF"
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        return "not an image (unknown format)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"corrupt or truncated: {e}"
    return None


def find_unreadable_images(path, num_workers=None, progress=None):
    """[(file, reason)] for every image under path that cannot be decoded (sorted by file).

    path: a data_path (with train/ and val/) or a split folder of class folders.
    progress: optional callable(done, total), called every 1000 files.
    """
    if not os.path.isdir(path):
        from .folder import DatasetError
        raise DatasetError(f"dataset folder not found: {path}")
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


class BadImageMonitor:
    """Records the files MindSpore's pipeline reports as erroneous samples, from stderr.

    Usage (the trainer)::

        monitor = BadImageMonitor().start()
        for epoch ...:
            ... iterate the dataset ...
            count, new_files = monitor.collect()   # after the epoch's last batch
            # log count once per epoch, and each file in new_files once per run
        monitor.stop()

    While started, the process's stderr (fd 2) goes through a pipe: every line is passed on
    unchanged except MindSpore's erroneous-sample warnings (hidden when hide=True, since the
    trainer reports them once per file instead of once per epoch).
    """

    MARKER = "The corresponding data file is: "

    def __init__(self, hide=True):
        self.hide = hide
        self._lock = threading.Lock()
        self._count = 0
        self._pending = []
        self._reported = set()
        self._busy = False
        self._saved = None
        self._read = None
        self._thread = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        if self._thread is not None:
            return self
        sys.stderr.flush()
        self._saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._read = r
        self._thread = threading.Thread(target=self._pump, name="bad-image-monitor", daemon=True)
        self._thread.start()
        # at exit (after an uncaught exception's traceback went into the pipe), pass it all on
        atexit.register(self.stop)
        return self

    def stop(self, timeout=2.0):
        """Restore stderr. Lines still in the pipe are passed on first."""
        if self._thread is None:
            return
        atexit.unregister(self.stop)
        self._wait_idle(timeout)
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes our pipe's write end (fd 2): the pump sees end of file
        self._thread.join(timeout)
        if not self._thread.is_alive():  # a child process may still hold the write end
            os.close(self._read)
            os.close(self._saved)
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- results -----------------------------------------------------------------------------
    def collect(self, timeout=2.0):
        """(count, new_files): erroneous samples seen since the last call, and the files among
        them not returned by an earlier call (each bad file is reported once per run)."""
        self._wait_idle(timeout)
        with self._lock:
            count, pending = self._count, self._pending
            self._count, self._pending = 0, []
        new = []
        for f in pending:
            if f not in self._reported:
                self._reported.add(f)
                new.append(f)
        return count, new

    @property
    def all_files(self):
        return sorted(self._reported)

    # -- internals ---------------------------------------------------------------------------
    def _unread_bytes(self):
        buf = fcntl.ioctl(self._read, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    def _wait_idle(self, timeout):
        """Wait until everything written to stderr so far has been read and parsed."""
        if self._thread is None:
            return
        sys.stderr.flush()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                busy = self._busy
            if not busy and self._unread_bytes() == 0:
                return
            time.sleep(0.005)

    def _write(self, data):
        while data:
            n = os.write(self._saved, data)
            data = data[n:]

    def _pump(self):
        try:
            self._pump_lines()
        except Exception:  # never leave the process writing into a pipe that nobody reads
            os.dup2(self._saved, 2)
            with self._lock:
                self._busy = False
            self._write(b"[BadImageMonitor] stopped after an internal error; stderr restored\n")
            while True:
                chunk = os.read(self._read, 65536)
                if not chunk:
                    break
                self._write(chunk)

    def _pump_lines(self):
        tail = b""        # the current unfinished line
        echoed = 0        # bytes of `tail` already passed on
        while True:
            # busy is set before the read, so "no unread bytes and not busy" means all parsed
            select.select([self._read], [], [])
            with self._lock:
                self._busy = True
            chunk = os.read(self._read, 65536)
            if not chunk:
                with self._lock:
                    self._busy = False
                break
            try:
                tail += chunk
                *lines, tail_new = tail.split(b"\n")
                out = []
                for i, line in enumerate(lines):
                    skip = echoed if i == 0 else 0
                    if self._parse(line) and self.hide:
                        if skip:
                            out.append(b"\n")  # its start was already passed on: end that line
                        continue
                    out.append(line[skip:] + b"\n")
                tail = tail_new
                if lines:
                    echoed = 0
                # pass on an unfinished line now (progress bars with \r), unless it may be ours
                ours = self.hide and (b"erroneous" in tail or tail.startswith(b"[WARNING] MD"))
                if tail and not ours and len(tail) > echoed:
                    out.append(tail[echoed:])
                    echoed = len(tail)
                if out:
                    self._write(b"".join(out))
            finally:
                with self._lock:
                    self._busy = False
        if tail[echoed:]:
            self._write(tail[echoed:])

    def _parse(self, raw):
        """Record the file of an erroneous-sample warning; True if the line was one."""
        line = raw.decode("utf-8", "replace")
        if self.MARKER not in line or "erroneous sample" not in line:
            return False
        rest = line.split(self.MARKER, 1)[1]
        path = None
        # the message is "<path>. <error text>": take the shortest prefix that is a file
        for m in re.finditer(r"\. ", rest):
            if os.path.isfile(rest[:m.start()]):
                path = rest[:m.start()]
                break
        if path is None:
            path = rest.split(". ", 1)[0].strip()
        with self._lock:
            self._count += 1
            self._pending.append(path)
        return True


# Signatures of the formats MindSpore's Decode reads (JPEG, PNG, BMP, TIFF).
_SIGNATURES = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


# Bytes at the end of a JPEG searched for its end marker (some writers pad after it).
JPEG_TAIL = 4096


class UndecodableImageError(ValueError):
    pass


def image_guard(data):
    """Pass the encoded image through, or raise for a file MindSpore's decoder must not see.

    Raising here lets bad_image_mode replace/skip the sample and log its path. Two reasons:
    MindSpore 2.8's decoder dies with SIGFPE (divide error in the data engine: the whole process
    is killed) on a JPEG cut off between its frame header and its start-of-scan marker; and once
    a Python op precedes the C++ decoder, the decoder's own failures no longer name the file.
    So: empty files, unknown signatures (text, HTML, GIF/WebP, which the decoder would also copy
    into the working folder), JPEGs cut before their image data, and JPEGs without their end
    marker (cut in the image data: the decoder may fill them with grey or fail without naming the
    file) are refused here. Cost: a few byte lookups a file.
    """
    buf = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")
    head = bytes(buf[:8])
    if not any(head.startswith(sig) for sig in _SIGNATURES):
        raise UndecodableImageError("empty file" if not len(buf) else "not a JPEG, PNG, BMP or TIFF image")
    if head.startswith(b"\xff\xd8"):
        _check_jpeg_header(buf)
        if bytes(buf[-JPEG_TAIL:]).rfind(b"\xff\xd9") < 0:  # FF D9 cannot occur inside scan data
            raise UndecodableImageError("JPEG has no end marker (truncated file)")
    return data


def _check_jpeg_header(buf):
    i, n = 2, len(buf)
    while True:
        if i + 4 > n:
            raise UndecodableImageError("JPEG ends before its image data (truncated file)")
        if buf[i] != 0xFF:
            return  # not a marker: let the decoder judge
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan: the decoder copes with a cut from here on
            return
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + (buf[i + 2] << 8 | buf[i + 3])
