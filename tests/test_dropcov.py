"""Tests of the DropCov head (src/dropcov.py) against independent references.

References written here in float64 NumPy from the paper (Wang et al., NeurIPS 2022) and the
authors' ResNet_ACD: ECA weights (also checked against torch.nn.Conv1d), the adaptive rate, channel
dropout applied to the features (not the head's S Cov S shortcut), covariance and upper triangle;
central finite differences of it (with the rate held at its value: no gradient flows through p) and
MindSpore autodiff of a plain forward without any bprop. GRAPH_MODE unless said otherwise.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.dropcov import DropCov, ECALayer, EcaConv, UniformDraw, adaptive_rate, channel_scale
from src.models import create_model
from tests.test_isqrt_cov import central_fd
from tests.tiny_heads import assert_float32_result, assert_non_finite_steps_skipped, mixed_precision_twins, tiny_net


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


# ---------------------------------------------------------------- float64 NumPy reference

def np_eca(x, w):
    """softmax over channels of the zero-padded 1-D cross-correlation of the channel means with w."""
    s = x.mean(axis=(2, 3))
    k = w.size
    pad = (k - 1) // 2
    sp = np.pad(s, ((0, 0), (pad, pad)))
    z = sum(w[j] * sp[:, j:j + s.shape[1]] for j in range(k))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_cov(x):
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h * w)
    xc = xr - xr.mean(axis=2, keepdims=True)
    return xc @ xc.transpose(0, 2, 1) / (h * w)


def np_triu(a):
    rows, cols = np.triu_indices(a.shape[-1])
    return a[:, rows, cols]


def np_rate(y, cov, rate_scale=10.0):
    r = cov.sum(axis=2)
    cos = (y * r).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1))
    return float(np.clip(1 - rate_scale / np.log2(y.shape[1]) * cos.mean(), 0, 1))


def np_dropcov_train(x, w, u, rate_scale=10.0, p=None):
    """(triu(Cov(Dropout2d_p(x * y + x))), p), the mask from draws u: channel kept where u >= p, * 1/(1-p).
    ``p`` given: the rate held fixed (for finite differences: the head passes no gradient through it)."""
    y = np_eca(x, w)
    xe = x * y[:, :, None, None] + x
    if p is None:
        p = np_rate(y, np_cov(xe), rate_scale)
    keep = (u >= p) / (1 - p) if p < 1 else np.zeros_like(u)
    return np_triu(np_cov(xe * keep[:, :, None, None])), p


def features(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * (np.maximum(rng.standard_normal(shape), 0) + 0.05 * rng.random(shape))


def rate_scale_for(x, w, p):
    """The rate_scale giving rate p on x: tests need a rate inside (0, 1)."""
    y = np_eca(x, w)
    xe = x * y[:, :, None, None] + x
    r = np_cov(xe).sum(axis=2)
    cos = ((y * r).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1))).mean()
    return float((1 - p) * np.log2(x.shape[1]) / cos)


class FixedDraw(nn.Cell):
    """Stands in for UniformDraw: returns the given draws."""

    def __init__(self, u):
        super().__init__()
        self.u = Tensor(np.asarray(u, np.float32))

    def construct(self, shape):
        return self.u


class Grads(nn.Cell):
    """(<net(x), dout>, d/dx, d/dweights) in one graph."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, dout):
        return (self.net(x) * dout).sum(), self.grad(self.net, self.weights)(x, dout)


def head(c, draws=None, **kw):
    net = DropCov(c, dimension_reduction=0, **kw)
    net.set_train(True)
    if draws is not None:
        net.draw = FixedDraw(draws)
    return net


def f32(a):
    return Tensor(np.asarray(a, np.float32))


# ---------------------------------------------------------------- pieces

def test_eca_weights_match_numpy_and_torch_conv1d():
    import torch
    x = features((3, 9, 4, 5), seed=1)
    eca = ECALayer(3)
    w = eca.conv.weight.asnumpy()
    assert w.shape == (1, 1, 3) and 0 < np.abs(w).max() <= 1 / np.sqrt(3)  # torch Conv1d's default init
    np.testing.assert_allclose(eca(f32(x)).asnumpy(), np_eca(x, w.reshape(-1)), rtol=1e-5, atol=1e-7)
    conv = torch.nn.Conv1d(1, 1, 5, padding=2, bias=False)
    mine = EcaConv(5)
    mine.weight.set_data(f32(conv.weight.detach().numpy()))
    s = np.random.default_rng(2).standard_normal((2, 11))
    with torch.no_grad():
        ref = conv(torch.tensor(s, dtype=torch.float32).unsqueeze(1)).squeeze(1).numpy()
    np.testing.assert_allclose(mine(f32(s)).asnumpy(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        EcaConv(4)


def test_rate_formula_clamps_and_passes_no_gradient():
    x = features((4, 16, 3, 3), seed=3)
    y = np_eca(x, np.array([0.3, -0.2, 0.5]))
    cov = np_cov(x * y[:, :, None, None] + x)
    for scale in (0.5, 10.0, rate_scale_for(x, np.array([0.3, -0.2, 0.5]), 0.4)):
        coef = scale / np.log2(16)
        got = adaptive_rate(f32(y), f32(cov), coef).asnumpy()
        assert got.shape == (1,)
        assert got[0] == pytest.approx(np_rate(y, cov, scale), abs=1e-6)
    assert adaptive_rate(f32(y), f32(cov), 0.5 / 4).asnumpy()[0] > 0.8  # weak scale: high rate
    assert adaptive_rate(f32(y), f32(cov), 10.0 / 4).asnumpy()[0] == 0.0  # clamped at 0
    assert adaptive_rate(f32(y), f32(-cov), 10.0 / 4).asnumpy()[0] == 1.0  # clamped at 1
    assert adaptive_rate(f32(y), f32(np.zeros_like(cov)), 2.5).asnumpy()[0] == 1.0  # dead maps: cosine 0

    def rate(a, b):
        return adaptive_rate(a, b, 0.1).sum()
    g = ms.grad(rate, grad_position=(0, 1))(f32(y), f32(cov))
    assert all(np.abs(t.asnumpy()).max() == 0 for t in g)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.75, 1.0])
def test_mask_statistics_and_scaling(p):
    """Drawn on the device: each (sample, channel) dropped with probability p, survivors * 1/(1-p)."""
    ms.set_seed(11)
    draw = UniformDraw()
    s = np.concatenate([channel_scale(draw((64, 256)), f32([p])).asnumpy() for _ in range(4)])
    assert np.isfinite(s).all()
    if p == 1.0:
        assert (s == 0).all()
        return
    kept = s > 0
    np.testing.assert_allclose(s[kept], 1 / (1 - p), rtol=1e-6)
    n = s.size
    assert abs((1 - kept.mean()) - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-12
    if 0 < p < 1:  # per-sample masks differ (channel dropout is per sample, as Dropout2d)
        assert (kept[0] != kept[1]).any()
        assert abs(s.mean() - 1) < 0.05  # unbiased: E[s] = 1


# ---------------------------------------------------------------- forward and backward

@pytest.mark.parametrize("shape", [(2, 6, 4, 4), (2, 12, 2, 2)], ids=["full_rank", "rank_deficient"])
def test_training_forward_and_backward_match_numpy(shape):
    b, c = shape[:2]
    x = features(shape, seed=4)
    u = np.random.default_rng(5).random((b, c))
    net = head(c, u)
    w = net.eca_layer.conv.weight.asnumpy().reshape(-1).astype(np.float64)
    net.rate_coef = rate_scale_for(x, w, 0.4) / np.log2(c)
    ref, p = np_dropcov_train(x, w, u, net.rate_coef * np.log2(c))
    assert p == pytest.approx(0.4) and 0 < (u < p).sum() < u.size  # some channels dropped, not all
    out = net(f32(x)).asnumpy()
    assert out.shape == (b, c * (c + 1) // 2) == (b, net.output_dim)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())

    dout = np.random.default_rng(6).standard_normal(ref.shape)
    _, ((dx,), (dw,)) = Grads(net)(f32(x), f32(dout))
    fx = central_fd(lambda v: np_dropcov_train(v, w, u, p=p)[0], x, dout)
    fw = central_fd(lambda v: np_dropcov_train(x, v, u, p=p)[0], w, dout)
    np.testing.assert_allclose(dx.asnumpy(), fx, rtol=1e-3, atol=1e-4 * np.abs(fx).max())
    np.testing.assert_allclose(dw.asnumpy().reshape(-1), fw, rtol=1e-3, atol=1e-4 * np.abs(fw).max())
    assert np.abs(fw).max() > 0  # ECA's weight trains (through x * y + x)


class PlainDropCov(nn.Cell):
    """The training forward with plain ops only (dropout on the features, no hand-written bprop)."""

    def __init__(self, ref):
        super().__init__()
        self.ref = ref

    def construct(self, x):
        r = self.ref
        b, c, h, w = x.shape
        y = r.eca_layer(x)
        x = x * y.reshape(b, c, 1, 1) + x
        xr = x.reshape(b, c, h * w)
        xc = xr - xr.mean(axis=2, keep_dims=True)
        cov = ops.matmul(xc, xc.transpose(0, 2, 1)) / (h * w)
        s = channel_scale(r.draw((b, c)), adaptive_rate(y, cov, r.rate_coef))
        xd = xc * s.reshape(b, c, 1)
        cov = ops.matmul(xd, xd.transpose(0, 2, 1)) / (h * w)
        rows, cols = np.triu_indices(c)
        return ops.gather(cov.reshape(b, c * c), Tensor((rows * c + cols).astype(np.int32)), 1)


def test_backward_matches_autodiff_of_a_plain_forward():
    x = features((3, 10, 3, 3), seed=7)
    u = np.random.default_rng(8).random((3, 10))
    net = head(10, u)
    net.rate_coef = rate_scale_for(x, net.eca_layer.conv.weight.asnumpy().reshape(-1), 0.5) / np.log2(10)
    dout = f32(np.random.default_rng(9).standard_normal((3, 55)))
    loss, ((dx,), (dw,)) = Grads(net)(f32(x), dout)
    loss_p, ((dx_p,), (dw_p,)) = Grads(PlainDropCov(net))(f32(x), dout)
    np.testing.assert_allclose(loss.asnumpy(), loss_p.asnumpy(), rtol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), dx_p.asnumpy(), rtol=1e-4, atol=1e-5 * np.abs(dx_p.asnumpy()).max())
    np.testing.assert_allclose(dw.asnumpy(), dw_p.asnumpy(), rtol=1e-4, atol=1e-6)


def test_zero_features_give_zero_output_and_finite_gradients():
    net = head(8, np.full((2, 8), 0.5))
    x = np.zeros((2, 8, 3, 3))
    loss, ((dx,), (dw,)) = Grads(net)(f32(x), f32(np.ones((2, 36))))
    assert loss.asnumpy() == 0 and np.isfinite(dx.asnumpy()).all() and np.isfinite(dw.asnumpy()).all()
    net.set_train(False)
    assert np.abs(net(f32(x)).asnumpy()).max() == 0


def test_seeded_masks_repeat_with_the_seed_and_differ_across_seeds():
    """As in a run: ms.set_seed(cfg.seed) before the network is built (src/engine.py's Trainer)."""
    x = features((4, 16, 3, 3), seed=10)

    def run(seed):
        ms.set_seed(seed)
        net = head(16)
        net.rate_coef = rate_scale_for(x, net.eca_layer.conv.weight.asnumpy().reshape(-1), 0.5) / 4
        return [net(f32(x)).asnumpy() for _ in range(2)]

    a, a2, b = run(3), run(3), run(4)
    assert not np.array_equal(a[0], a[1])  # a new mask every step
    np.testing.assert_array_equal(a[0], a2[0])
    np.testing.assert_array_equal(a[1], a2[1])
    assert not np.array_equal(a[0], b[0])


# ---------------------------------------------------------------- in the network

@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_eval_is_deterministic_and_equals_covariance_triu_fc(arch):
    net = create_model(arch, "dropcov", 5)
    rep = net.representation
    assert isinstance(rep, DropCov) and rep.dim == 256 and rep.output_dim == 32896
    assert net.classifier_kind == "linear"
    if arch == "resnet18":
        assert net.features.layer4[0].conv1.stride == (1, 1)  # layer4 at stride 1: 2x2 at 32 px
    names = {p.name for p in net.trainable_params()}
    assert {"layer_reduce.weight", "layer_reduce_bn.gamma", "eca_layer.conv.weight", "fc.weight"} <= names
    net.set_train(False)
    x = f32(np.random.default_rng(12).standard_normal((2, 3, 32, 32)))
    logits = net(x).asnumpy()
    np.testing.assert_array_equal(logits, net(x).asnumpy())
    f = net.forward_features(x)
    reduced = rep.reduce(f).asnumpy().astype(np.float64)
    assert reduced.shape == (2, 256, 2, 2)  # VGG: stride 16, its last pool dropped
    expected = np_triu(np_cov(reduced)) @ net.classifier.fc.weight.asnumpy().T + net.classifier.fc.bias.asnumpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _tiny_net():
    return tiny_net(DropCov(8, dimension_reduction=6), "dropcov")


def test_nan_input_is_a_skipped_step_with_weights_unchanged():
    assert_non_finite_steps_skipped(_tiny_net(), "eca_layer.conv.weight")


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_mixed_precision_keeps_every_dropcov_cell_float32(level):
    """src/precision.py flags the whole representation float32: the ECA conv, the rate and the
    covariance of the training path give the O0 values on the float16 features they receive."""
    ref, _, rep = mixed_precision_twins(_tiny_net, level)
    u = np.random.default_rng(15).random((2, 6))  # draws for the 6 reduced channels
    for r in (ref.representation, rep):
        r.set_train(True)
        r.draw = FixedDraw(u)
        r.rate_coef = 0.3  # a rate inside (0, 1) for these features
    assert_float32_result(rep, ref.representation, features((2, 8, 4, 4), seed=14).astype(np.float16))
