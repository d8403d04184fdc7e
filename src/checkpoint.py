"""Checkpoints: atomic writes, validated loading, and the rank-0 manager (latest / best / every N epochs).

Atomic writes matter because a job killed while writing must leave the previous file loadable:
every file is written to a temporary name in the same folder, flushed, then renamed over the old one.
"""
import glob
import os
import re
import time

import numpy as np
import mindspore as ms

from src.errors import CheckpointError, first_line, name_list
from src.run_log import write_json


# Test hook: seconds to wait between writing the temporary file and renaming it, so a test can
# kill the process at that moment.
DELAY_ENV = "ISQRT_COV_CHECKPOINT_DELAY"




META_KEYS = ("epoch", "step_in_epoch", "arch", "head", "num_classes", "best_top1",
             "top1", "complete_epoch")


def save_atomic(save_obj, path, meta=None):
    """Write ``save_obj`` (a Cell or a list of {'name', 'data'}) to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # MindSpore appends ".ckpt" to names that lack it: keep the suffix on the temporary name.
    tmp = os.path.join(folder, f".tmp{os.getpid()}.{os.path.basename(path)}")
    ms.save_checkpoint(save_obj, tmp, append_dict=dict(meta or {}))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if os.environ.get(DELAY_ENV):
        time.sleep(float(os.environ[DELAY_ENV]))
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path):
    """Parameters and metadata of a checkpoint file, with a clear error when it is absent or unreadable."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file '{path}' does not exist: pass an existing .ckpt path")
    try:
        params = ms.load_checkpoint(path)
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError with long internal messages.
        first = first_line(exc)
        raise CheckpointError(f"cannot read checkpoint '{path}' ({first}); is it a MindSpore .ckpt? "
                              "PyTorch .pth files go through scripts/convert_torch_checkpoint.py") from None
    meta = {}
    for key in META_KEYS:
        if key in params:
            value = params.pop(key)
            meta[key] = value.asnumpy().item() if hasattr(value, "asnumpy") else value
    return params, meta


def match_network(net, params, path, classifier_prefix="fc.", skip_classifier=False):
    """The subset of ``params`` to load into ``net``; raises CheckpointError listing what does not fit.

    Extra entries that belong to training state (optimizer moments, step counters, loss scale) are
    ignored. With ``skip_classifier`` a classifier of another shape is left out (finetuning).
    """
    wanted = {p.name: p for p in net.get_parameters()}
    missing, shape_bad, skipped, chosen = [], [], [], {}
    for name, param in wanted.items():
        if name not in params:
            missing.append(name)
            continue
        src = params[name]
        if tuple(src.shape) != tuple(param.shape):
            if skip_classifier and name.startswith(classifier_prefix):
                skipped.append(name)
                continue
            shape_bad.append(f"{name} {tuple(src.shape)} vs {tuple(param.shape)}")
            continue
        chosen[name] = src
    if skip_classifier:
        missing_cls = [n for n in missing if n.startswith(classifier_prefix)]
        skipped += missing_cls
        missing = [n for n in missing if not n.startswith(classifier_prefix)]
        # Fixed, untrained parameters a head draws at construction (CBP's hashes) may be absent when
        # finetuning from another head's weights (e.g. an ImageNet GAP ResNet): they keep their draw.
        drawn = set(getattr(getattr(net, "representation", None), "drawn_params", ()))
        missing = [n for n in missing if n not in drawn]
    unexpected = [n for n in params if n not in wanted and not _is_training_state(n)]
    if missing or shape_bad or unexpected:
        fc_w = classifier_prefix + "weight"
        hint = ""
        if fc_w in params and fc_w in wanted and params[fc_w].shape[0] != wanted[fc_w].shape[0] \
                and not missing and not unexpected and all(s.startswith(classifier_prefix) for s in shape_bad):
            hint = (f"; the checkpoint has {params[fc_w].shape[0]} classes and the network "
                    f"{wanted[fc_w].shape[0]}: set --num_classes={params[fc_w].shape[0]}, or use --pre_trained "
                    "to start a finetuning with a new classifier")
        else:
            hint = "; was it saved for another --arch/--head/--dimension_reduction?"
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {name_list(unexpected)}")
        if shape_bad:
            parts.append(f"wrong shape {len(shape_bad)}: {name_list(shape_bad, 4)}")
        raise CheckpointError(f"checkpoint '{path}' does not fit the network ({'; '.join(parts)}){hint}")
    return chosen, skipped


def _is_training_state(name):
    return (name.startswith(("moments.", "accum.", "learning_rate", "momentum", "global_step",
                             "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                             "epoch_num", "step_num", "loss_scale"))
            or name in ("global_step", "learning_rate", "momentum"))


def load_network(net, path, classifier_prefix="fc.", skip_classifier=False):
    """Load a checkpoint into ``net`` after checking it fits; returns (meta, skipped names)."""
    params, meta = read_checkpoint(path)
    chosen, skipped = match_network(net, params, path, classifier_prefix, skip_classifier)
    ms.load_param_into_net(net, chosen, strict_load=True)
    return meta, skipped


def load_train_state(train_cell, path, net, classifier_prefix="fc."):
    """Load a full training state (network, optimizer moments, step, loss scale) for --resume_ckpt."""
    params, meta = read_checkpoint(path)
    match_network(net, params, path, classifier_prefix)
    state_names = {p.name for p in train_cell.get_parameters()}
    absent = sorted(n for n in state_names if n not in params)
    if absent:
        raise CheckpointError(f"checkpoint '{path}' holds no training state ({name_list(absent, 4)} missing): "
                              "resume from <output_path>/ckpt/latest.ckpt, or use --pre_trained to "
                              "initialise the weights only")
    if "epoch" not in meta:
        raise CheckpointError(f"checkpoint '{path}' has no epoch/step record: resume needs latest.ckpt")
    ms.load_param_into_net(train_cell, {k: v for k, v in params.items() if k in state_names})
    return meta


def all_finite(cell):
    """True when every parameter of ``cell`` is finite: a NaN model is never written."""
    return all(np.isfinite(p.asnumpy()).all() for p in cell.get_parameters())


class CheckpointManager:
    """Writes latest.ckpt (full training state), best.ckpt and epoch_<N>.ckpt (weights), rank 0 only."""

    def __init__(self, ckpt_dir, keep_max=5, enabled=True):
        self.dir = ckpt_dir
        self.keep_max = keep_max
        self.enabled = enabled
        if enabled:
            os.makedirs(ckpt_dir, exist_ok=True)

    @property
    def latest(self):
        return os.path.join(self.dir, "latest.ckpt")

    @property
    def best(self):
        return os.path.join(self.dir, "best.ckpt")

    def save_latest(self, train_cell, meta):
        if self.enabled:
            save_atomic(train_cell, self.latest, meta)

    def save_best(self, net, meta):
        if self.enabled:
            save_atomic(net, self.best, meta)

    def save_epoch(self, net, epoch, meta):
        if not self.enabled:
            return
        save_atomic(net, os.path.join(self.dir, f"epoch_{epoch:03d}.ckpt"), meta)
        kept = sorted(glob.glob(os.path.join(self.dir, "epoch_*.ckpt")),
                      key=lambda p: int(re.findall(r"epoch_(\d+)", p)[-1]))
        for old in kept[:-self.keep_max] if self.keep_max > 0 else []:
            os.remove(old)

    def write_json(self, name, obj):
        if self.enabled:
            write_json(os.path.join(self.dir, name), obj)
