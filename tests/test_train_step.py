"""The training step: the lr schedule follows the steps taken, applied or skipped."""
import mindspore as ms
import numpy as np

from src.config import load_config
from src.factory import build_optimizer, build_train_step
from src.models import create_model


def _fc(net):
    return next(p for p in net.trainable_params() if p.name == "fc.weight").asnumpy()


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
