"""A tiny network around a representation, for the head tests (tests/test_dropcov.py, tests/test_isice.py):
the TrainStep's non-finite-step handling and mixed precision, without compiling a ResNet."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.config import load_config
from src.factory import build_optimizer, build_train_step
from src.models.network import ClassificationNet
from src.precision import apply_precision, check_float32


class TinyBackbone(nn.Cell):
    """One strided 3x3 conv + ReLU: (B, 3, H, W) -> (B, 8, H/2, W/2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, pad_mode="pad", padding=1)
        self.out_channels = 8

    def construct(self, x):
        return ops.relu(self.conv(x))


def tiny_net(representation, head):
    return ClassificationNet(TinyBackbone(), representation, 3, arch="tiny", head=head)


def assert_non_finite_steps_skipped(net, trained):
    """A NaN and an Inf pixel each give a skipped step (control[0] = 1) that leaves every weight as
    it was and the BatchNorm statistics finite; a clean batch then trains (``trained``, a parameter name, moves). Float32 training
    stops with exit 3 on such a step (tests/test_faults.py); this is the step it sees."""
    cfg = load_config(["--amp_level=O0", "--device_target=CPU"])
    step = build_train_step(cfg, net, build_optimizer(cfg, net, np.full(4, 0.1, np.float32)))
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    x = np.random.default_rng(13).standard_normal((4, 3, 8, 8)).astype(np.float32)
    labels = Tensor(np.array([0, 1, 2, 0], np.int32))
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[1, :, 2, 2] = bad
        _, control = step(Tensor(x_bad), labels, Tensor(0.0, ms.float32))
        control = control.asnumpy()
        assert control[0] == 1  # overflow: skipped
        if control[3]:  # the step poisoned the BatchNorm statistics: the loop puts the last finite ones back
            step.restore_statistics()
        for p in net.get_parameters():
            if p.requires_grad:  # weights: untouched
                np.testing.assert_array_equal(p.asnumpy(), before[p.name], err_msg=p.name)
            else:  # statistics: finite (those of a skipped step are kept when finite, as loss scalers do)
                assert np.isfinite(p.asnumpy()).all(), p.name
    loss, control = step(Tensor(x), labels, Tensor(0.0, ms.float32))
    assert control.asnumpy()[0] == 0 and np.isfinite(loss.asnumpy())
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert not np.array_equal(params[trained], before[trained])


def mixed_precision_twins(build, level):
    """(O0 network, the same weights at ``level``, its representation Cell): apply_precision must
    leave every cell of the representation flagged float32 (O2 wraps it to cast its output to
    float16 for the classifier, so the Cell is taken before)."""
    ms.set_seed(1)
    ref, net = build(), build()
    ms.load_param_into_net(net, {p.name: ms.Parameter(Tensor(p.asnumpy()), name=p.name) for p in ref.get_parameters()})
    rep = net.representation
    apply_precision(net, level)
    check_float32(net, rep)
    return ref, net, rep


def assert_float32_result(rep, ref_rep, x16, rtol=2e-5):
    """``rep`` (at a float16 level) on the float16 features a float16 backbone hands over gives the
    float32 (O0) representation's output on the same values: no float16 step inside."""
    expected = ref_rep(Tensor(x16.astype(np.float32))).asnumpy()
    out = rep(Tensor(x16)).asnumpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
