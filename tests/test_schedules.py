"""LR schedules: values at milestones, warm-up, cosine end points, lengths; torch as the reference."""
import math

import numpy as np
import pytest
import torch

from src.config import load_config
from src.schedules import cosine_lr, create_lr_schedule, scaled_lr, step_lr


def _torch_per_epoch(make_sched, lr, epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_step_matches_torch_multisteplr_and_milestones():
    lrs = step_lr(0.1, epochs=65, steps_per_epoch=3, milestones=[30, 45, 60], gamma=0.1)
    assert lrs.dtype == np.float32 and lrs.shape == (65 * 3,)
    ref = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [30, 45, 60], 0.1), 0.1, 65)
    np.testing.assert_allclose(lrs, np.repeat(ref, 3), rtol=1e-6)
    # the change happens exactly at the first step of each milestone epoch
    for m, value in [(30, 0.01), (45, 0.001), (60, 0.0001)]:
        assert lrs[m * 3 - 1] == pytest.approx(value * 10, rel=1e-6)
        assert lrs[m * 3] == pytest.approx(value, rel=1e-6)
    # constant when there are no milestones (the finetuning recipe)
    assert np.all(step_lr(1.2e-3, 4, 5, []) == np.float32(1.2e-3))


def test_linear_warmup_then_step():
    lrs = step_lr(0.4, epochs=4, steps_per_epoch=10, milestones=[3], gamma=0.5, warmup_epochs=2, warmup_lr_init=0.1)
    w = 20
    np.testing.assert_allclose(lrs[:w], 0.1 + 0.3 * np.arange(w) / w, rtol=1e-6)
    assert lrs[0] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:w + 1]) > 0)
    assert lrs[w] == pytest.approx(0.4) and lrs[29] == pytest.approx(0.4)
    assert lrs[30] == pytest.approx(0.2)
    # fractional warm-up epochs are per step
    assert np.count_nonzero(step_lr(1.0, 2, 10, [], warmup_epochs=0.5) < 1.0) == 5


def test_cosine_matches_torch_and_end_points():
    epochs, spe = 6, 7
    lrs = cosine_lr(0.2, epochs, spe, lr_end=0.01)
    total = epochs * spe
    assert lrs.dtype == np.float32 and lrs.shape == (total,)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.01)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, ref, rtol=1e-5)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[total // 2] == pytest.approx(0.105, rel=1e-5)
    assert 0.01 < lrs[-1] < 0.01 + 0.2 * (1 - math.cos(math.pi / total))  # one step short of lr_end
    assert np.all(np.diff(lrs) <= 0)


def test_cosine_with_warmup_starts_decay_after_warmup():
    lrs = cosine_lr(1.0, epochs=5, steps_per_epoch=4, lr_end=0.0, warmup_epochs=1, warmup_lr_init=0.0)
    np.testing.assert_allclose(lrs[:4], [0.0, 0.25, 0.5, 0.75])
    assert lrs[4] == pytest.approx(1.0)
    t = np.arange(16)
    np.testing.assert_allclose(lrs[4:], 0.5 * (1 + np.cos(np.pi * t / 16)), rtol=1e-6, atol=1e-7)


def test_create_lr_schedule_picks_and_scales(tmp_path):
    cfg = load_config(["--lr=0.1", "--batch_size=40", "--device_num=2", "--run_distribute=True", "--lr_base_batch=160", "--epoch_size=65",
                       "--lr_schedule=step", "--lr_milestones=30,45,60", "--warmup_epochs=0"])
    assert scaled_lr(cfg) == pytest.approx(0.05)  # 0.1 * 40 * 2 / 160
    lrs = create_lr_schedule(cfg, steps_per_epoch=2)
    np.testing.assert_allclose(lrs, step_lr(0.05, 65, 2, [30, 45, 60]), rtol=1e-7)
    cfg.lr_schedule = "cosine"
    cfg.warmup_epochs = 1
    cfg.lr_end = 0.001
    lrs = create_lr_schedule(cfg, steps_per_epoch=2)
    assert lrs.shape == (130,)
    np.testing.assert_allclose(lrs, cosine_lr(0.05, 65, 2, 0.001, 1, 0.0), rtol=1e-7)
    assert lrs[2] == pytest.approx(0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        step_lr(0.1, 3, 0, [1])
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_lr(0.1, 3, 2, warmup_epochs=-1)
