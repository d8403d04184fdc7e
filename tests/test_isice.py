"""Tests of the iSICE head (src/isice.py) against independent references.

References written here in float64 NumPy from the paper (Rahman et al., CVPR 2023, Algorithm 2) and
the authors' SICE.py: every step computed (the last one's gradient term included), the inverse as
the square of their 7-step Newton-Schulz inverse square root, and the ridge given as a matrix, so
that their random regulariser can be compared with the head's deterministic one; central finite
differences of it, and MindSpore autodiff of a plain forward without any bprop. GRAPH_MODE.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.isice import ISICE, ISICE_EPS, step_sizes
from src.isqrt_cov import TRACE_EPS, num_products
from src.models import create_model
from tests.test_isqrt_cov import central_fd
from tests.test_sqrt_methods import PlainInvSqrtm
from tests.tiny_heads import assert_float32_result, assert_non_finite_steps_skipped, mixed_precision_twins, tiny_net


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


# ---------------------------------------------------------------- float64 NumPy reference

def np_cov(x):
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h * w)
    ihat = (np.eye(h * w) - 1.0 / (h * w)) / (h * w)
    return xr @ ihat @ xr.transpose(0, 2, 1)


def np_inv_sqrt_ns(a, n):
    """The authors' Sqrtm: A/tr(A), ZY = (3I - A)/2, Y = A ZY, Z = ZY, n-2 coupled steps, a last
    Z step, divided by sqrt(tr A)."""
    eye = np.eye(a.shape[-1])
    tr = np.trace(a, axis1=1, axis2=2)[:, None, None]
    an = a / tr
    zy = 0.5 * (3 * eye - an)
    y, z = an @ zy, zy
    for _ in range(n - 2):
        zy = 0.5 * (3 * eye - z @ y)
        y, z = y @ zy, zy @ z
    z = 0.5 * (3 * eye - z @ y) @ z
    return z / np.sqrt(tr)


def np_isice_matrix(x, steps=5, lam=0.01, eta=1.0, n=7, ridge=None):
    """Algorithm 2 on the features x (B, d, H, W): P / sqrt(tr P). ``ridge`` (d, d) or (B, d, d): the
    matrix added before every inverse (the authors': 1e-10 everywhere + 1e-9 diag(U[0, 1)))."""
    sigma = np_cov(x)
    d = sigma.shape[-1]
    ridge = ISICE_EPS * np.eye(d) if ridge is None else ridge
    c = sigma / (np.trace(sigma, axis1=1, axis2=2)[:, None, None] + TRACE_EPS)

    def inv(a):
        z = np_inv_sqrt_ns(a + ridge, n)
        return z @ z

    p = inv(c)
    for t in range(steps):
        g = -inv(p) + 0.5 * (c + c.transpose(0, 2, 1))
        dec = 1 - t / (steps - 1.0) if steps > 1 else 1.0
        plus = np.maximum(np.maximum(p, 0) - eta * dec * (g + lam), 0)
        minus = np.maximum(np.maximum(-p, 0) - eta * dec * (-g + lam), 0)
        p = plus - minus
        p = 0.5 * (p + p.transpose(0, 2, 1))
    return p / np.sqrt(np.trace(p, axis1=1, axis2=2))[:, None, None]


def np_isice(x, **kw):
    out = np_isice_matrix(x, **kw)
    rows, cols = np.triu_indices(out.shape[-1])
    return out[:, rows, cols]


def features(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * (np.maximum(rng.standard_normal(shape), 0) + 0.1 * rng.random(shape))


def f32(a):
    return Tensor(np.asarray(a, np.float32))


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


class Grads(nn.Cell):
    """(<net(x), dout>, d/dx) in one graph."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation(sens_param=True)

    def construct(self, x, dout):
        return (self.net(x) * dout).sum(), self.grad(self.net)(x, dout)


class PlainISICE(nn.Cell):
    """The same algorithm with plain ops only (tests/test_sqrt_methods.py's PlainInvSqrtm: Z0 = I
    multiplied literally), every step computed, differentiated by MindSpore autodiff."""

    def __init__(self, steps=5, lam=0.01, eta=1.0, n=7):
        super().__init__()
        self.steps, self.lam, self.eta = steps, lam, eta
        self.inv_sqrtm = PlainInvSqrtm(n)

    def inv(self, a, eye):
        z = self.inv_sqrtm(a + ISICE_EPS * eye)
        return ops.matmul(z, z)

    def construct(self, x):
        b, d, h, w = x.shape
        eye = Tensor(np.eye(d, dtype=np.float32))
        xr = x.reshape(b, d, h * w)
        xc = xr - xr.mean(axis=2, keep_dims=True)
        sigma = ops.matmul(xc, xc.transpose(0, 2, 1)) / (h * w)
        c = sigma / ((sigma * eye).sum(axis=(1, 2), keepdims=True) + TRACE_EPS)
        p = self.inv(c, eye)
        for t in range(self.steps):
            g = 0.5 * (c + c.transpose(0, 2, 1)) - self.inv(p, eye)
            dec = self.eta * (1 - t / (self.steps - 1.0))
            plus = ops.relu(ops.relu(p) - dec * (g + self.lam))
            minus = ops.relu(ops.relu(-p) - dec * (self.lam - g))
            p = plus - minus
            p = 0.5 * (p + p.transpose(0, 2, 1))
        p = p / ops.sqrt((p * eye).sum(axis=(1, 2), keepdims=True))
        rows, cols = np.triu_indices(d)
        return ops.gather(p.reshape(b, d * d), Tensor((rows * d + cols).astype(np.int32)), 1)


# ---------------------------------------------------------------- the reference itself

def test_reference_estimates_a_sparse_precision_matrix():
    """Sanity of the float64 reference (not of the head): with lambda 0 and many steps of decaying
    size it approaches C^-1 (normalised); with lambda > 0 it zeroes entries, the authors' point."""
    x = features((1, 4, 6, 6), seed=1)
    c = np_cov(x)
    c = c / np.trace(c, axis1=1, axis2=2)[:, None, None]
    inv = np.linalg.inv(c)
    inv = inv / np.sqrt(np.trace(inv, axis1=1, axis2=2))[:, None, None]
    assert rel(np_isice_matrix(x, steps=5, lam=0.0, n=30), inv) < 1e-6
    assert (np.abs(np_isice_matrix(x, lam=0.5)) < 1e-12).sum() > 0


def test_step_sizes_decay_linearly_to_zero():
    assert step_sizes(5, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert step_sizes(1, 2.0) == [2.0]
    with pytest.raises(ValueError, match="steps"):
        ISICE(4, steps=0)


# ---------------------------------------------------------------- forward and backward

CASES = {"full_rank": (2, 5, 4, 4), "rank_deficient": (2, 6, 2, 2)}  # M = 16 > d = 5; M = 4 < d = 6


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_match_numpy(case):
    shape = CASES[case]
    d = shape[1]
    x = features(shape, seed=2)
    net = ISICE(d, dimension_reduction=0)
    out = net(f32(x)).asnumpy()
    ref = np_isice(x)
    assert out.shape == ref.shape == (2, d * (d + 1) // 2) == (2, net.output_dim)
    assert rel(out, ref) < 1e-4
    dout = np.random.default_rng(3).standard_normal(ref.shape)
    loss, dx = Grads(net)(f32(x), f32(dout))
    assert loss.asnumpy() == pytest.approx((ref * dout).sum(), rel=1e-4)
    fd = central_fd(np_isice, x, dout)
    assert rel(dx.asnumpy(), fd) < 1e-3
    _, dx_plain = Grads(PlainISICE())(f32(x), f32(dout))
    assert rel(dx.asnumpy(), dx_plain.asnumpy().astype(np.float64)) < 1e-4


@pytest.mark.parametrize("lam, zeros", [(0.0, 0), (0.05, 3), (0.2, 9)])
def test_sparsity_zeroes_the_entries_the_reference_zeroes(lam, zeros):
    """lambda soft-thresholds the precision matrix: exact zeros where the reference has them."""
    x = features((2, 6, 4, 4), seed=12)
    ref = np_isice(x, lam=lam)
    out = ISICE(6, dimension_reduction=0, sparsity=lam)(f32(x)).asnumpy()
    assert rel(out, ref) < 1e-4
    where = np.abs(ref) < 1e-12
    assert where.sum() == zeros  # of 42 entries, more as lambda grows
    np.testing.assert_array_equal(out[where], 0.0)


def test_deterministic_ridge_is_within_1e_6_of_the_authors_random_one():
    """SICE.py adds 1e-10 + 1e-9 diag(rand) before every inverse; the head adds 1e-9 I. On full-rank
    and rank-deficient covariances (32 channels, 3x3 and 8x8 maps) any draw of theirs gives the
    same output to 1e-6, far below float32's resolution of the head's output."""
    rng = np.random.default_rng(4)
    for shape in ((2, 32, 3, 3), (2, 32, 8, 8)):
        x = features(shape, seed=5)
        ours = np_isice(x)
        for _ in range(3):
            ridge = 1e-10 + 1e-9 * np.stack([np.diag(rng.random(32)) for _ in range(2)])
            assert rel(np_isice(x, ridge=ridge), ours) < 1e-6


def test_last_step_computes_no_inverse(pynative_mode):
    """eta_{T-1} = 0: T inverses (the first included), not T + 1; matmul_flops counts them."""
    net = ISICE(4, dimension_reduction=0, steps=5)
    calls = []
    inner = net.inv_sqrtm

    class Counting(nn.Cell):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def construct(self, a):
            calls.append(a.shape)
            return self.inner(a)

    net.inv_sqrtm = Counting()
    net(f32(features((1, 4, 3, 3), seed=6)))
    assert len(calls) == 5
    assert net.matmul_flops(3, 3) == 4 * 4 * 9 + 5 * (num_products(7, True) + 1) * 4 ** 3


def test_zero_features_give_finite_outputs_and_gradients():
    net = ISICE(6, dimension_reduction=0)
    x = np.zeros((2, 6, 3, 3))
    loss, dx = Grads(net)(f32(x), f32(np.ones((2, 21))))
    out = net(f32(x)).asnumpy()
    assert np.isfinite(out).all() and np.isfinite(loss.asnumpy()) and np.isfinite(dx.asnumpy()).all()
    assert rel(out, np_isice(x)) < 1e-4


def test_stress_rank_deficient_at_256_channels():
    """d = 256 on a 7x7 map (ResNet-50 at 224 with layer4 at stride 2): finite output and gradient,
    the float64 reference's output."""
    x = features((1, 256, 7, 7), seed=7)
    net = ISICE(256, dimension_reduction=0)
    out = net(f32(x)).asnumpy()
    assert rel(out, np_isice(x)) < 1e-3
    _, dx = Grads(net)(f32(x), f32(np.random.default_rng(8).standard_normal(out.shape)))
    assert np.isfinite(dx.asnumpy()).all() and np.abs(dx.asnumpy()).max() > 0


# ---------------------------------------------------------------- in the network

@pytest.mark.parametrize("arch, size, hw", [("resnet18", 64, 2), ("vgg16_bn", 32, 2)])
def test_network_layout_and_logits(arch, size, hw):
    net = create_model(arch, "isice", 4)
    rep = net.representation
    assert isinstance(rep, ISICE) and rep.dim == 256 and rep.output_dim == 32896
    assert (rep.steps, rep.sparsity, rep.rates[0], rep.ns_iter) == (5, 0.01, 1.0, 7)
    assert net.classifier_kind == "linear"
    names = {p.name for p in net.trainable_params()}
    assert {"layer_reduce.weight", "layer_reduce_bn.gamma", "fc.weight"} <= names
    net.set_train(False)
    x = f32(np.random.default_rng(9).standard_normal((2, 3, size, size)))
    f = net.forward_features(x)
    assert f.shape[2:] == (hw, hw)  # ResNet layer4 at stride 2 (64 px -> 2x2), VGG without its last pool
    reduced = rep.reduce(f).asnumpy().astype(np.float64)
    expected = np_isice(reduced) @ net.classifier.fc.weight.asnumpy().T + net.classifier.fc.bias.asnumpy()
    got = net(x).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def _tiny_net():
    return tiny_net(ISICE(8, dimension_reduction=6), "isice")


def test_nan_input_is_a_skipped_step_with_weights_unchanged():
    assert_non_finite_steps_skipped(_tiny_net(), "layer_reduce.weight")


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_mixed_precision_keeps_every_isice_cell_float32(level):
    ref, _, rep = mixed_precision_twins(_tiny_net, level)
    ref.representation.set_train(False)
    rep.set_train(False)
    assert_float32_result(rep, ref.representation, features((2, 8, 4, 4), seed=11).astype(np.float16))
