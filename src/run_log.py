"""What a person reads during a run: per-rank log files, metrics.jsonl and curves.png (rank 0),
and the atomic writer every file of a run goes through (checkpoints, JSON, the saved config)."""
import errno
import json
import logging
import os
import re
import shutil
import sys

from src.errors import CheckpointError, first_line

# Temporary names are ".tmp<pid>.<final name>"; MindSpore's checkpoint writer adds its own
# ".tmp<pid>.<stem>.tmp" next to it.
_TMP_NAME = re.compile(r"^\.tmp(\d+)\.")
_SPACE_ERRNOS = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space within your quota there",
                 errno.EFBIG: "the file system or `ulimit -f` limits file size: use another file system"}


def atomic_write(path, write, needed_bytes=None):
    """Create ``path`` through ``write(tmp_path)``, then rename it over the old file.

    A crash leaves the old file whole. A failed write (an OSError: disk full, quota, read-only
    folder) removes this process's temporary files and raises a one-line CheckpointError naming
    the path, the space needed (``needed_bytes``, else the old file's size) and what to do.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp{os.getpid()}.{os.path.basename(path)}")
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        _remove_temporaries(folder, os.path.basename(path))
        if isinstance(exc, OSError):
            raise write_error(path, exc, needed_bytes) from exc
        raise


def _remove_temporaries(folder, final_name):
    """This process's temporary files for ``final_name``: ours and MindSpore's."""
    ours = f".tmp{os.getpid()}.{final_name}"
    mindspore_s = f".tmp{os.getpid()}.{os.path.splitext(final_name)[0]}.tmp"
    for name in (ours, mindspore_s):
        try:
            os.remove(os.path.join(folder, name))
        except OSError:  # absent, or the disk is failing: the original error matters more
            pass


def remove_stale_temporaries(folder):
    """Delete temporary files that crashed processes (SIGKILL, power loss) left in ``folder``;
    returns their names. Files of processes still alive on this host are kept."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        match = _TMP_NAME.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(n):
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"


def write_error(path, exc, needed_bytes=None):
    """The one-line error for an OSError ``exc`` raised while writing ``path`` (temporaries gone)."""
    folder = os.path.dirname(os.path.abspath(path))
    reason = exc.strerror or first_line(exc)
    if exc.errno not in _SPACE_ERRNOS:
        return CheckpointError(f"cannot write {path} ({reason}); the previous files there are unchanged: make "
                               f"{folder} writable or set --output_path to another folder")
    if not needed_bytes and os.path.isfile(path):
        needed_bytes = os.path.getsize(path)
    need = f"it needs about {_size(needed_bytes)}, " if needed_bytes else ""
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    latest = os.path.join(folder, "latest.ckpt")
    resume = f"; continue with --resume_ckpt={latest}" if os.path.isfile(latest) else ""
    return CheckpointError(f"cannot write {path} ({reason}): {need}{_size(free)} free; the previous files there "
                           f"are unchanged: {_SPACE_ERRNOS[exc.errno]}, or set --output_path to a disk with "
                           f"room{resume}")


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write, needed_bytes=len(text.encode("utf-8")))


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (see atomic_write)."""
    write_text(path, json.dumps(obj, indent=1))


def setup_logger(output_path, rank, to_file=True):
    """Console + <output_path>/logs/rank_<r>.log for every rank: each rank logs to its own file."""
    logger = logging.getLogger("isqrt_cov")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if to_file:
        log_dir = os.path.join(output_path, "logs")
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(log_dir, f"rank_{rank}.log"))
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsWriter:
    """Appends one JSON line per epoch and redraws the loss / top-1 curves (rank 0 only)."""

    def __init__(self, output_path, enabled=True):
        self.enabled = enabled
        self.jsonl = os.path.join(output_path, "metrics.jsonl")
        self.png = os.path.join(output_path, "curves.png")
        self.rows = []
        if enabled and os.path.isfile(self.jsonl):  # a resumed run keeps its history
            with open(self.jsonl) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def add(self, row):
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._plot()

    def _plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        epochs = [r["epoch"] for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(epochs, [r.get("train_loss") for r in self.rows], "o-", label="train")
        val = [(r["epoch"], r["val_loss"], r["val_top1"]) for r in self.rows if r.get("val_top1") is not None]
        if val:
            ax1.plot([v[0] for v in val], [v[1] for v in val], "s-", label="val")
            ax2.plot([v[0] for v in val], [100 * v[2] for v in val], "s-", color="C1")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.legend()
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("val top-1 (%)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            atomic_write(self.png, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
        finally:
            plt.close(fig)
