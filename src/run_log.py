"""What a person reads during a run: per-rank log files, metrics.jsonl and curves.png (rank 0)."""
import json
import logging
import os
import sys


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp{os.getpid()}.{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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
        with open(self.jsonl, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
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
        tmp = self.png + ".tmp.png"
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.png)
