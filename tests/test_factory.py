"""Optimizer groups, precision levels and the training step's refusal of non-finite updates."""
import mindspore as ms
import numpy as np
import pytest

from src.config import load_config
from src.factory import build_optimizer, build_train_step, param_groups, resolve_amp_level
from src.models import create_model


def _cfg(*flags):
    return load_config(["--num_classes=3", "--dimension_reduction=8"] + list(flags))


@pytest.fixture(scope="module")
def net():
    ms.set_context(mode=ms.GRAPH_MODE)
    return create_model("resnet18", "isqrt_cov", 3, dimension_reduction=8)


def test_param_groups_classifier_factor_and_no_decay(net):
    lr = np.linspace(0.1, 0.0, 7).astype(np.float32)
    groups = param_groups(_cfg("--classifier_lr_factor=5", "--no_decay_bn_bias=True", "--weight_decay=0.001"),
                          net, lr)
    seen = {}
    for g in groups:
        for p in g["params"]:
            seen[p.name] = (g["lr"].asnumpy(), g["weight_decay"])
    assert set(seen) == {p.name for p in net.trainable_params()}
    np.testing.assert_allclose(seen["fc.weight"][0], 5 * lr, rtol=1e-6)
    np.testing.assert_allclose(seen["conv1.weight"][0], lr, rtol=1e-6)
    assert seen["fc.weight"][1] == 0.001 and seen["conv1.weight"][1] == 0.001
    assert seen["fc.bias"][1] == 0.0 and seen["bn1.gamma"][1] == 0.0 and seen["layer_reduce_bn.beta"][1] == 0.0
    plain = param_groups(_cfg(), net, lr)
    assert len(plain) == 2 and all(g["weight_decay"] == 1e-4 for g in plain)  # classifier, rest


def test_amp_levels():
    assert resolve_amp_level(_cfg("--device_target=CPU")) == "O0"
    cfg = _cfg()
    cfg.device_target = "GPU"  # resolution only: no device is touched
    assert resolve_amp_level(cfg) == "O2"
    # Float16 levels run on CPU too, to check the GPU configuration (tests/test_precision.py).
    assert resolve_amp_level(_cfg("--amp_level=O2")) == "O2"


def _snapshot(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_train_step_applies_finite_updates_and_refuses_nan(net):
    cfg = _cfg("--lr=0.1")
    steps = 4
    opt = build_optimizer(cfg, net, np.full(steps, 0.1, np.float32))
    step = build_train_step(cfg, net, opt)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1, 2, 0], np.int32))
    before = _snapshot(net)
    go = ms.Tensor(0.0, ms.float32)
    loss, control = step(x, y, go)
    overflow, stop, scale, poisoned = control.asnumpy()
    assert np.isfinite(loss.asnumpy()) and overflow == 0 and stop == 0 and scale == 1.0 and poisoned == 0
    after = _snapshot(net)
    assert not np.allclose(after["fc.weight"], before["fc.weight"])
    assert int(opt.global_step.asnumpy().item()) == 1

    moments_before = {p.name: p.asnumpy().copy() for p in opt.moments}
    loss, control = step(x * float("nan"), y, ms.Tensor(15.0, ms.float32))
    # overflow, this rank's stop request passed on, and the BN statistics the NaN forward poisoned
    assert tuple(control.asnumpy()[[0, 1, 3]]) == (1.0, 15.0, 1.0)
    assert not np.isfinite(net.features.bn1.moving_mean.asnumpy()).all()
    step.restore_statistics()  # what the loop does when it reads that control
    nan_after = _snapshot(net)
    # no trace of the skipped step: weights, momentum, and the BN running statistics once restored
    moments = {p.name: p.asnumpy() for p in opt.moments}
    assert all(np.array_equal(v, moments_before[k]) for k, v in moments.items())
    for name in ("fc.weight", "conv1.weight", "layer_reduce.weight", "bn1.moving_mean", "layer4.1.bn2.moving_variance",
                 "layer_reduce_bn.moving_mean"):
        np.testing.assert_array_equal(nan_after[name], after[name], err_msg=name)
    loss, control = step(x, y, go)  # training goes on from the same state
    assert np.isfinite(loss.asnumpy()) and tuple(control.asnumpy()[[0, 3]]) == (0, 0)
