"""The training step (src/train_step.py): its update is MindSpore's Momentum, a skipped step leaves no
trace but the step count, and k accumulated micro-batches make the update of one batch k times larger."""
import os
import re
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.config import load_config
from src.factory import NetWithLoss, build_optimizer, build_train_step
from src.isqrt_cov import ISqrtCov
from src.models import create_model
from src.schedules import create_lr_schedule
from src.train_step import TrainStep
from tests.helpers import ENV, HOOKED_TRAIN, ROOT, make_image_folder, stop_when_logged, tiny_flags


def _fc(net):
    return next(p for p in net.trainable_params() if p.name == "fc.weight").asnumpy()


def _params(cell):
    return {p.name: p.asnumpy().copy() for p in cell.get_parameters()}


def test_the_update_is_mindspores_momentum_with_groups_and_weight_decay():
    """Three steps of the project's step against MindSpore's TrainOneStepCell + nn.Momentum over the
    same parameter groups (classifier at 3x lr, BN and biases without decay, a per-step lr): the
    same weights, BatchNorm statistics and momentum buffers."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = load_config(["--num_classes=3", "--dimension_reduction=8", "--amp_level=O0", "--no_decay_bn_bias=True",
                       "--classifier_lr_factor=3", "--weight_decay=0.01"])
    lr = np.array([0.1, 0.05, 0.02, 0.01], np.float32)
    nets = []
    for _ in range(2):
        ms.set_seed(5)
        nets.append(create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8))
    step = build_train_step(cfg, nets[0], build_optimizer(cfg, nets[0], lr))
    ref = nn.TrainOneStepCell(NetWithLoss(nets[1]), build_optimizer(cfg, nets[1], lr))
    ref.set_train(True)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
        y = ms.Tensor(rng.integers(0, 3, 4).astype(np.int32))
        loss, _ = step(x, y, ms.Tensor(0.0, ms.float32))
        assert float(loss.asnumpy()) == pytest.approx(float(ref(x, y).asnumpy()), rel=1e-5)
    ours, theirs = _params(step), _params(ref)
    assert {n for n in theirs if n.startswith("moments.")} <= set(ours)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_skipped_step_advances_the_lr_schedule():
    """lr = [0, 0.1, 0, ...]: step 0 (NaN batch) is skipped; step 1 must use lr[1] = 0.1 and move the
    weights (by the schedule of applied steps it would use lr[0] = 0 and move nothing); step 2 uses
    lr[2] = 0 and, momentum aside, the weight decay term is also scaled by 0."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(5)
    cfg = load_config(["--num_classes=3", "--dimension_reduction=8", "--amp_level=O0", "--momentum=0",
                       "--weight_decay=0"])
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8)
    lr = np.array([0.0, 0.1, 0.0, 0.0], np.float32)
    opt = build_optimizer(cfg, net, lr)
    step = build_train_step(cfg, net, opt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = ms.Tensor(np.array([0, 1, 2, 0], np.int32))
    stop = ms.Tensor(0.0, ms.float32)
    w0 = _fc(net).copy()
    _, control = step(ms.Tensor(x * np.nan), y, stop)
    assert control.asnumpy()[0] == 1  # skipped
    assert np.array_equal(_fc(net), w0) and int(opt.global_step.asnumpy()[0]) == 1
    step(ms.Tensor(x), y, stop)
    w1 = _fc(net).copy()
    assert int(opt.global_step.asnumpy()[0]) == 2 and np.abs(w1 - w0).max() > 1e-4
    step(ms.Tensor(x), y, stop)  # lr[2] = 0, no momentum: nothing moves
    np.testing.assert_array_equal(_fc(net), w1)
    assert int(opt.global_step.asnumpy()[0]) == 3


class _SmallNet(nn.Cell):
    """Conv + BatchNorm (evaluation mode: its statistics do not depend on how the batch is split)
    + iSQRT-COV + classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, has_bias=True)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.representation = ISqrtCov(6, dimension_reduction=None, iter_num=3)
        self.fc = nn.Dense(self.representation.output_dim, 3)

    def construct(self, x):
        return self.fc(self.representation(self.relu(self.bn(self.conv(x)))))


def _small_step(k, dynamic, lr):
    ms.set_seed(3)
    net = _SmallNet()
    cfg = load_config(["--weight_decay=0.001", "--momentum=0.9"])
    opt = build_optimizer(cfg, net, lr)
    scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 10, scale_factor=2, scale_window=1000) \
        if dynamic else None
    step = TrainStep(NetWithLoss(net), opt, 2.0 ** 10 if dynamic else 1.0, scale, accumulation=k)
    step.set_train(True)
    net.bn.set_train(False)  # evaluation mode inside the training step
    return step, opt


@pytest.mark.parametrize("dynamic", [False, True])
def test_k_micro_batches_make_the_update_of_one_batch_k_times_larger(dynamic):
    """k = 3 micro-batches of 2 against one batch of 6 (same lr, the loss a mean either way): the same
    weights and momentum after each update, also when the first micro-batch of an update holds a
    NaN (the whole update is skipped, as the big batch holding it is) and after it (the buffers
    start clean). With a dynamic loss scale the gradients are scaled and unscaled on the way."""
    ms.set_context(mode=ms.GRAPH_MODE)
    lr = np.array([0.05, 0.05, 0.02, 0.01], np.float32)
    acc, acc_opt = _small_step(3, dynamic, lr)
    big, big_opt = _small_step(1, dynamic, lr)
    rng = np.random.default_rng(1)
    stop = ms.Tensor(0.0, ms.float32)
    for update in range(3):
        x = rng.standard_normal((6, 3, 12, 12)).astype(np.float32)
        y = rng.integers(0, 3, 6).astype(np.int32)
        if update == 1:
            x[0] = np.nan
        before = _params(acc)
        micro = [(ms.Tensor(x[i:i + 2]), ms.Tensor(y[i:i + 2])) for i in (0, 2, 4)]
        loss_a, control_a = acc.run(micro, stop)
        loss_b, control_b = big(ms.Tensor(x), ms.Tensor(y), stop)
        assert control_a.asnumpy()[0] == control_b.asnumpy()[0] == (1.0 if update == 1 else 0.0)
        after = _params(acc)
        if update == 1:  # skipped: weights and momentum as they were
            for name in (p.name for p in acc_opt.parameters + acc_opt.moments):
                np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        else:
            assert float(loss_a.asnumpy()) == pytest.approx(float(loss_b.asnumpy()), rel=1e-5)
        theirs = _params(big)
        for p in big_opt.parameters + big_opt.moments:
            np.testing.assert_allclose(after[p.name], theirs[p.name], rtol=2e-5, atol=1e-7, err_msg=p.name)
    assert int(acc_opt.global_step.asnumpy()[0]) == int(big_opt.global_step.asnumpy()[0]) == 3
    accum = [p for p in acc.get_parameters() if p.name.startswith("step_cache.accum")]
    assert len(accum) == len(acc_opt.parameters) and all(not p.asnumpy().any() for p in accum)


def test_the_lr_follows_the_total_batch_of_an_update():
    """lr = cfg.lr x batch_size x device_num x grad_accumulation_steps / lr_base_batch."""
    common = ["--run_distribute=True", "--device_num=2", "--lr=0.1", "--lr_base_batch=160", "--warmup_epochs=0",
              "--epoch_size=2"]
    a = load_config(["--batch_size=5", "--grad_accumulation_steps=4"] + common)
    np.testing.assert_allclose(create_lr_schedule(a, 3)[0], 0.1 * 40 / 160, rtol=1e-6)
    b = load_config(["--batch_size=20"] + common)
    np.testing.assert_array_equal(create_lr_schedule(a, 3), create_lr_schedule(b, 3))


def _train(data, out, tmp_path, log_delay="", **kw):
    # log_delay (tests/hooks.py): a SIGTERM sent on reading a step's line lands before the epoch ends
    return subprocess.Popen([sys.executable, os.path.join(ROOT, HOOKED_TRAIN)] + tiny_flags(data, out, **kw),
                            cwd=str(tmp_path), env=dict(ENV, ISQRT_COV_LOG_DELAY=log_delay), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_train_py_counts_updates_stops_and_resumes_with_accumulation(tmp_path):
    """train.py with batch 3 x 2 micro-batches on 24 images: 4 updates per epoch (as batch 6 would
    have), logged and scheduled per update (the demo config's cosine lr); SIGTERM inside epoch 2 saves at an update, and the
    resumed run (which skips that many micro-batches) ends with the uninterrupted run's weights."""
    data = make_image_folder(str(tmp_path / "data"), train_per_class=8, val_per_class=1, size=24)
    flags = dict(batch_size=3, grad_accumulation_steps=2, lr_base_batch=6, lr=0.05,
                 train_transform="resize_center_crop", train_resize=32)  # a resumed run draws random crops afresh
    whole = _train(data, str(tmp_path / "whole"), tmp_path, **flags)
    log_whole = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, log_whole[-3000:]
    assert "4 steps/epoch x 2 epochs, 1 device(s) x batch 3" in log_whole
    steps = re.findall(r"epoch (\d)/2 step (\d)/4 loss \S+ lr (\S+)", log_whole)
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in "12" for s in "1234"]
    # cosine over 8 updates from 0.05 x (3 x 1 x 2) / 6 (16 micro-batches would make it twice as long)
    expected = [0.05 * (1 + np.cos(np.pi * i / 8)) / 2 for i in range(8)]
    np.testing.assert_allclose([float(lr) for _, _, lr in steps], expected, atol=1e-6)

    out = str(tmp_path / "stopped")
    proc = _train(data, out, tmp_path, log_delay="1", **flags)
    log = stop_when_logged(proc, "epoch 2/2 step 1/4")
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    latest = os.path.join(out, "ckpt", "latest.ckpt")
    state = ms.load_checkpoint(latest)
    stopped = int(state["step_in_epoch"].asnumpy())
    assert int(state["epoch"].asnumpy()) == 1 and 1 <= stopped < 4, log[-3000:]
    assert int(state["global_step"].asnumpy()[0]) == 4 + stopped  # updates, not micro-batches
    assert not any(name.startswith("step_cache.") for name in state)  # buffers are not training state
    resumed = _train(data, out, tmp_path, resume_ckpt=latest, **flags)
    log_resumed = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log_resumed[-3000:]
    assert f"at epoch 2 step {stopped}" in log_resumed
    assert re.findall(r"epoch 2/2 step (\d)/4", log_resumed) == [str(s) for s in range(stopped + 1, 5)]
    ref = ms.load_checkpoint(os.path.join(str(tmp_path / "whole"), "ckpt", "latest.ckpt"))
    got = ms.load_checkpoint(latest)
    for name, value in ref.items():
        if name.startswith(("conv", "layer", "fc.", "moments.")) and "moving" not in name:
            np.testing.assert_allclose(got[name].asnumpy(), value.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=name)
