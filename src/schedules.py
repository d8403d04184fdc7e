"""Learning-rate schedules as per-step arrays (float32, length epochs * steps_per_epoch).

Why arrays: MindSpore's optimizers take a per-step lr Tensor, and a resumed run only has to index
the same array at its global step to continue the schedule exactly.

Warm-up (optional, both schedules): the first round(warmup_epochs * steps_per_epoch) steps rise
linearly from warmup_lr_init (step 0) towards the base lr, reached at the first step after it.
"""
import math

import numpy as np


def _warmup_steps(warmup_epochs, steps_per_epoch, total):
    w = int(round(float(warmup_epochs) * steps_per_epoch))
    if w < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    return min(w, total)


def _check(epochs, steps_per_epoch):
    if int(epochs) < 1 or int(steps_per_epoch) < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    return int(epochs) * int(steps_per_epoch)


def _apply_warmup(lrs, lr, warmup_steps, warmup_lr_init):
    if warmup_steps > 0:
        i = np.arange(warmup_steps, dtype=np.float64)
        lrs[:warmup_steps] = warmup_lr_init + (lr - warmup_lr_init) * i / warmup_steps
    return lrs


def step_lr(lr, epochs, steps_per_epoch, milestones, gamma=0.1, warmup_epochs=0, warmup_lr_init=0.0):
    """lr * gamma**k in epoch e, k = number of milestones <= e (milestones in epochs, 0-based).

    E.g. milestones [30, 45, 60]: epochs 0-29 at lr, 30-44 at lr/10, ... (as torch's MultiStepLR).
    The warm-up replaces the first steps; milestones stay counted from epoch 0.
    """
    total = _check(epochs, steps_per_epoch)
    epoch_of_step = np.arange(total) // int(steps_per_epoch)
    k = np.searchsorted(np.asarray(sorted(milestones), dtype=np.int64), epoch_of_step, side="right")
    lrs = lr * np.power(float(gamma), k)
    lrs = _apply_warmup(lrs, lr, _warmup_steps(warmup_epochs, steps_per_epoch, total), warmup_lr_init)
    return lrs.astype(np.float32)


def cosine_lr(lr, epochs, steps_per_epoch, lr_end=0.0, warmup_epochs=0, warmup_lr_init=0.0):
    """Per-step cosine decay from lr to lr_end over the steps after the warm-up.

    Step t of the T post-warm-up steps: lr_end + (lr - lr_end) (1 + cos(pi t / T)) / 2, so the
    first is lr and the value after the last step would be exactly lr_end.
    """
    total = _check(epochs, steps_per_epoch)
    w = _warmup_steps(warmup_epochs, steps_per_epoch, total)
    t = np.arange(total - w, dtype=np.float64)
    decay = lr_end + (lr - lr_end) * 0.5 * (1.0 + np.cos(math.pi * t / max(total - w, 1)))
    lrs = np.concatenate([np.zeros(w), decay])
    lrs = _apply_warmup(lrs, lr, w, warmup_lr_init)
    return lrs.astype(np.float32)


def total_batch(cfg):
    """Images per update: batch_size x device_num x grad_accumulation_steps."""
    return int(cfg.batch_size) * int(cfg.device_num) * int(cfg.grad_accumulation_steps)


def scaled_lr(cfg):
    """The linear scaling rule: cfg.lr * total_batch(cfg) / lr_base_batch.

    cfg.lr is the lr tuned for a total batch of cfg.lr_base_batch images; a run with another total
    batch (per-device batch_size times device_num times the accumulated micro-batches) scales it
    proportionally (Goyal et al. 2017).
    """
    return float(cfg.lr) * total_batch(cfg) / int(cfg.lr_base_batch)


def _step_from_cfg(cfg, lr, steps_per_epoch):
    return step_lr(lr, cfg.epoch_size, steps_per_epoch, cfg.lr_milestones, cfg.lr_gamma,
                   cfg.warmup_epochs, cfg.warmup_lr_init)


def _cosine_from_cfg(cfg, lr, steps_per_epoch):
    return cosine_lr(lr, cfg.epoch_size, steps_per_epoch, cfg.lr_end, cfg.warmup_epochs, cfg.warmup_lr_init)


SCHEDULES = {"step": _step_from_cfg, "cosine": _cosine_from_cfg}


def create_lr_schedule(cfg, steps_per_epoch):
    """Per-step lr array for the whole run (cfg.epoch_size epochs), picked by cfg.lr_schedule.

    The peak lr is scaled_lr(cfg) = cfg.lr * total_batch(cfg) / cfg.lr_base_batch
    (linear scaling rule); warmup_lr_init and lr_end are absolute values, not scaled.
    The classifier's group uses this array times cfg.classifier_lr_factor.
    """
    return SCHEDULES[cfg.lr_schedule](cfg, scaled_lr(cfg), int(steps_per_epoch))
