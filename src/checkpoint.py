"""Checkpoints: atomic writes, validated loading, and the rank-0 manager (latest / best / every N epochs).

Atomic writes matter because a job killed while writing must leave the previous file loadable:
every file is written to a temporary name in the same folder, flushed, then renamed over the old one
(src.run_log.atomic_write; a failed write, e.g. a full disk, removes the temporary file and raises
a one-line CheckpointError).
"""
import glob
import os
import re

import numpy as np
import mindspore as ms

from src.errors import CheckpointError, first_line, name_list
from src.run_log import atomic_write, remove_stale_temporaries, write_json
from src.models.ms_layouts import rename_ms_params
from src.train_step import CACHE_PREFIX


# name prefixes of every classifier kind of src.models (one fc; VGG's classifier.0/3/6 MLP)
CLASSIFIER_PREFIXES = ("fc.", "classifier.")

META_KEYS = ("epoch", "step_in_epoch", "arch", "head", "num_classes", "best_top1", "top1",
             "steps_per_epoch", "global_batch")


def save_atomic(save_obj, path, meta=None):
    """Write ``save_obj`` (a Cell or a list of {'name', 'data'}) to ``path`` atomically."""
    def write(tmp):
        # MindSpore appends ".ckpt" to names that lack it: the temporary name keeps the suffix.
        ms.save_checkpoint(save_obj, tmp, append_dict=dict(meta or {}))
    atomic_write(path, write, needed_bytes=_payload_bytes(save_obj))


def _payload_bytes(save_obj):
    """Bytes of the tensors a checkpoint of ``save_obj`` holds (the file is a little larger)."""
    if isinstance(save_obj, ms.nn.Cell):
        return sum(p.nbytes for p in save_obj.get_parameters())
    return sum(getattr(item["data"], "nbytes", 0) for item in save_obj)


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


def head_parameter_names(net):
    """Names of the parameters of ``net``'s head, its ``representation`` and ``classifier`` cells:
    what a finetuning may start afresh (another head, another number of classes)."""
    return {p.name for cell in (net.representation, net.classifier) for p in cell.get_parameters()}


def match_network(net, params, path, pre_trained=False):
    """The entries of ``params`` to load into ``net``, and {name: why} of those left at initialisation.

    Every parameter of ``net`` must be in ``params`` with its shape; extra entries of the training
    state (optimizer moments, step counters, loss scale) are ignored. With ``pre_trained``
    (finetuning) the head's parameters may be absent or of another shape: they keep their
    initialisation. Anything else that does not fit raises CheckpointError listing it.
    """
    wanted = {p.name: tuple(p.shape) for p in net.get_parameters()}
    absent = [n for n in wanted if n not in params]
    reshaped = [n for n in wanted if n in params and tuple(params[n].shape) != wanted[n]]
    unexpected = [n for n in params if n not in wanted and not _is_training_state(n)]
    left = {}
    if pre_trained:
        head = head_parameter_names(net)
        left.update({n: "not in the checkpoint" for n in absent if n in head})
        left.update({n: "another shape in the checkpoint" for n in reshaped if n in head})
        absent = [n for n in absent if n not in left]
        reshaped = [n for n in reshaped if n not in left]
        # the checkpoint's classifier of another kind (VGG's MLP, finetuned with one fc) is not needed
        unexpected = [n for n in unexpected if not n.startswith(CLASSIFIER_PREFIXES)]
    if absent or reshaped or unexpected:
        parts = []
        if absent:
            parts.append(f"missing {len(absent)}: {name_list(absent)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {name_list(unexpected)}")
        if reshaped:
            shapes = [f"{n} {tuple(params[n].shape)} vs {wanted[n]}" for n in reshaped]
            parts.append(f"wrong shape {len(reshaped)}: {name_list(shapes, 4)}")
        raise CheckpointError(f"checkpoint '{path}' does not fit the network ({'; '.join(parts)})"
                              f"{_misfit_hint(net, params, absent, reshaped, unexpected, pre_trained)}")
    return {n: params[n] for n in wanted if n not in left}, left


def _misfit_hint(net, params, absent, reshaped, unexpected, pre_trained):
    classifier = {p.name: tuple(p.shape) for p in net.classifier.get_parameters()}
    if reshaped and not absent and not unexpected and set(reshaped) <= set(classifier):
        theirs, ours = params[reshaped[0]].shape[0], classifier[reshaped[0]][0]
        if theirs != ours:
            return (f"; the checkpoint has {theirs} classes and the network {ours}: set --num_classes={theirs}, "
                    "or use --pre_trained to start a finetuning with a new classifier")
    if pre_trained:
        return ("; --pre_trained needs the whole backbone and nothing this network lacks (only the "
                "representation and classifier may be absent or differ): was it saved for another --arch or --head?")
    return "; was it saved for another --arch/--head/--dimension_reduction?"


def _is_training_state(name):
    return (name.startswith(("moments.", "accum.", "learning_rate", "momentum", "global_step", "adam_m.", "adam_v.",
                             "adamw_step",
                             "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                             "epoch_num", "step_num", "loss_scale", CACHE_PREFIX))
            or name in ("global_step", "learning_rate", "momentum"))


def load_network(net, path, *, pre_trained=False):
    """Load a checkpoint into ``net`` after checking it fits (see match_network).

    Returns (metadata, {name: why} of the parameters left at initialisation)."""
    params, meta = read_checkpoint(path)
    if pre_trained:  # mindcv / model zoo ResNet names -> ours (src/models/ms_layouts.py)
        meta["layout"], params = rename_ms_params(params)
    chosen, left = match_network(net, params, path, pre_trained)
    ms.load_param_into_net(net, chosen, strict_load=True)
    return meta, left


def load_pretrained(net, path):
    """--pre_trained: initialise ``net`` from ``path`` (the backbone completely, the head where it
    fits, e.g. a torchvision backbone converted for iSQRT-COV). Returns the line to log."""
    meta, left = load_network(net, path, pre_trained=True)
    loaded = sum(1 for p in net.get_parameters() if p.name not in left)
    layout = f" ({meta['layout']} names)" if meta.get("layout") else ""
    line = f"initialised from {path}{layout}: {loaded} parameters loaded"
    if not left:
        return line
    by_reason = {}
    for name, why in left.items():
        by_reason.setdefault(why, []).append(name)
    return line + f"; {len(left)} left at initialisation: " + "; ".join(
        f"{name_list(names)} ({why})" for why, names in by_reason.items())


def load_train_state(train_cell, path, net):
    """Load a full training state (network, optimizer moments, loss scale) for --resume_ckpt.

    The optimizer's per-step learning-rate arrays are not restored: the schedule is the current
    config's (a longer epoch_size extends it), and the caller sets the optimizer's step."""
    params, meta = read_checkpoint(path)
    match_network(net, params, path)
    state_names = {p.name for p in train_cell.get_parameters()
                   if not p.name.startswith(("learning_rate", CACHE_PREFIX))}
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
        self.removed_temporaries = []
        if enabled:
            os.makedirs(ckpt_dir, exist_ok=True)
            # A process killed while writing (SIGKILL, power loss) leaves a temporary file as large
            # as a checkpoint: on a nearly full disk the next attempt would fail for its sake.
            self.removed_temporaries = remove_stale_temporaries(ckpt_dir)

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
