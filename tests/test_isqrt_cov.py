"""Tests of the iSQRT-COV meta-layer (src/isqrt_cov.py) against independent references.

References: a float64 NumPy implementation of the paper's equations (written here, with Z0 = I
multiplied literally), central finite differences of it, and MindSpore autodiff of the same
forward written without any bprop. Both GRAPH_MODE (training) and PYNATIVE_MODE are checked.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.isqrt_cov import (CovPool, ISqrtCov, Sqrtm, TriuVec, TRACE_EPS, num_products,
                           triu_indices_flat)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    ms.set_context(mode=MODES[request.param], device_target="CPU")
    yield request.param
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


# ---------------------------------------------------------------- float64 NumPy reference

def np_cov(x):
    b, c, h, w = x.shape
    m = h * w
    xr = x.reshape(b, c, m)
    ihat = (np.eye(m) - np.ones((m, m)) / m) / m
    return xr @ ihat @ xr.transpose(0, 2, 1)


def np_sqrtm(a, iter_num, inverse=False):
    """Y0 = A/tr(A), Z0 = I, T = (3I - ZY)/2, Y <- YT, Z <- TZ; the last step computes Y only (then
    Y_N sqrt(tr)) or, ``inverse``, Z only (then Z_N / sqrt(tr), iSICE's inverse square root)."""
    d = a.shape[-1]
    eye = np.eye(d)
    norm = np.trace(a, axis1=1, axis2=2)[:, None, None] + TRACE_EPS
    y, z = a / norm, np.broadcast_to(eye, a.shape)
    for k in range(1, iter_num + 1):
        t = (3 * eye - z @ y) / 2
        last = k == iter_num
        y, z = (None if last and inverse else y @ t), (None if last and not inverse else t @ z)
    return z / np.sqrt(norm) if inverse else y * np.sqrt(norm)


def np_triu(a):
    d = a.shape[-1]
    rows, cols = np.triu_indices(d)
    return a[:, rows, cols]


def np_isqrt(x, iter_num):
    return np_triu(np_sqrtm(np_cov(x), iter_num))


def central_fd(f, x, dout, h=1e-6):
    """d<f(x), dout>/dx by central differences in float64."""
    x = x.astype(np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = ((f(xp) - f(xm)) * dout).sum() / (2 * h)
    return g


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- plain-autodiff MindSpore forward

class PlainCovPool(nn.Cell):
    def construct(self, x):
        b, c, h, w = x.shape
        xr = x.reshape(b, c, h * w)
        xc = xr - xr.mean(axis=2, keep_dims=True)
        return ops.matmul(xc, xc.transpose(0, 2, 1)) / (h * w)


class PlainSqrtm(nn.Cell):
    def __init__(self, iter_num, inverse=False):
        super().__init__()
        self.iter_num = iter_num
        self.inverse = inverse

    def construct(self, a):
        d = a.shape[-1]
        eye = Tensor(np.eye(d, dtype=np.float32))
        norm = (a * eye).sum(axis=(1, 2), keepdims=True) + TRACE_EPS
        y = a / norm
        z = eye
        for k in range(1, self.iter_num + 1):
            t = (3.0 * eye - ops.matmul(z, y)) / 2.0
            if k < self.iter_num or not self.inverse:
                y = ops.matmul(y, t)
            if k < self.iter_num or self.inverse:
                z = ops.matmul(t, z)
        return z / ops.sqrt(norm) if self.inverse else y * ops.sqrt(norm)


class PlainTriuVec(nn.Cell):
    def construct(self, a):
        b, d, _ = a.shape
        return ops.gather(a.reshape(b, d * d), Tensor(triu_indices_flat(d)), 1)


class PlainISqrt(nn.Cell):
    def __init__(self, iter_num):
        super().__init__()
        self.cov, self.sqrtm, self.triu = PlainCovPool(), PlainSqrtm(iter_num), PlainTriuVec()

    def construct(self, x):
        return self.triu(self.sqrtm(self.cov(x)))


class VJP(nn.Cell):
    """Gradient of <net(x), dout> w.r.t. x, compiled as one graph in GRAPH_MODE."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.grad = ops.GradOperation(sens_param=True)

    def construct(self, x, dout):
        return self.grad(self.net)(x, dout)


def run(net, x):
    return net(Tensor(np.asarray(x, np.float32))).asnumpy()


def vjp(net, x, dout):
    return VJP(net)(Tensor(np.asarray(x, np.float32)), Tensor(np.asarray(dout, np.float32))).asnumpy()


def features(rng, shape, scale=1.0):
    """Post-ReLU-like activations, as the meta-layer sees them."""
    return scale * np.maximum(rng.standard_normal(shape), 0) + 0.1 * scale * rng.random(shape)


def spd(rng, b, d, m=None):
    """Well-conditioned covariance matrices (m >> d samples)."""
    m = m or 4 * d
    x = rng.standard_normal((b, d, m))
    return x @ x.transpose(0, 2, 1) / m + 0.1 * np.eye(d)


# ---------------------------------------------------------------- forward

def test_forward_each_cell_matches_numpy(mode):
    rng = np.random.default_rng(0)
    x = features(rng, (2, 6, 4, 3))
    a = spd(rng, 2, 6)
    assert rel(run(CovPool(), x), np_cov(x)) < 1e-5
    for n in (1, 3, 5):
        assert rel(run(Sqrtm(n), a), np_sqrtm(a, n)) < 1e-5, n
    assert rel(run(TriuVec(), a), np_triu(a)) < 1e-5
    assert rel(run(ISqrtCov(6, dimension_reduction=None, iter_num=5), x), np_isqrt(x, 5)) < 1e-5


def test_forward_with_dimension_reduction_matches_numpy(mode):
    """1x1 conv + BatchNorm (inference statistics) + ReLU, then the meta-layer."""
    rng = np.random.default_rng(1)
    net = ISqrtCov(10, dimension_reduction=6, iter_num=5)
    net.set_train(False)
    bn = net.layer_reduce_bn
    bn.gamma.set_data(Tensor(rng.uniform(0.5, 1.5, 6).astype(np.float32)))
    bn.beta.set_data(Tensor(rng.uniform(0.0, 0.5, 6).astype(np.float32)))
    bn.moving_mean.set_data(Tensor(rng.uniform(-0.2, 0.2, 6).astype(np.float32)))
    bn.moving_variance.set_data(Tensor(rng.uniform(0.5, 2.0, 6).astype(np.float32)))
    x = rng.standard_normal((2, 10, 4, 4))
    w = net.layer_reduce.weight.asnumpy().astype(np.float64)[:, :, 0, 0]
    h = np.einsum("oc,bchw->bohw", w, x.astype(np.float32).astype(np.float64))
    p = {k: getattr(bn, k).asnumpy().astype(np.float64)[None, :, None, None]
         for k in ("gamma", "beta", "moving_mean", "moving_variance")}
    h = (h - p["moving_mean"]) / np.sqrt(p["moving_variance"] + 1e-5) * p["gamma"] + p["beta"]
    out = run(net, x)
    assert out.shape == (2, net.output_dim) == (2, 21)
    assert rel(out, np_isqrt(np.maximum(h, 0), 5)) < 1e-5


def test_sqrtm_converges_to_eigendecomposition_sqrt_and_is_symmetric(mode):
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((3, 8, 8)))
    lam = rng.uniform(1.0, 3.0, (3, 8))
    a = q @ (lam[:, :, None] * q.transpose(0, 2, 1))
    a = (a + a.transpose(0, 2, 1)) / 2
    c = run(Sqrtm(20), a)
    w, v = np.linalg.eigh(a)
    ref = v @ (np.sqrt(w)[:, :, None] * v.transpose(0, 2, 1))
    assert rel(c, ref) < 1e-4
    assert np.abs(c - c.transpose(0, 2, 1)).max() / np.abs(c).max() < 1e-5


def test_triuvec_order_length_and_backward_scatter(mode):
    d = 7
    a = np.arange(2 * d * d, dtype=np.float64).reshape(2, d, d)
    out = run(TriuVec(), a)
    rows, cols = np.triu_indices(d)
    assert out.shape == (2, d * (d + 1) // 2)
    np.testing.assert_array_equal(out, a[:, rows, cols])
    dout = np.random.default_rng(3).standard_normal(out.shape)
    expected = np.zeros((2, d, d))
    expected[:, rows, cols] = dout
    np.testing.assert_array_equal(vjp(TriuVec(), a, dout), expected.astype(np.float32))


def test_output_dim():
    assert ISqrtCov(2048, dimension_reduction=256).output_dim == 32896
    assert ISqrtCov(8, dimension_reduction=None).output_dim == 36
    assert ISqrtCov(8, dimension_reduction=None, is_vec=False).output_dim == 64
    assert [num_products(n) for n in (1, 2, 3, 5)] == [1, 3, 6, 12]


# ---------------------------------------------------------------- backward

def _check_grad(net, plain, f64, x, dout):
    g = vjp(net, x, dout)
    assert np.isfinite(g).all()
    assert rel(g, vjp(plain, x, dout).astype(np.float64)) < 1e-4
    assert rel(g, central_fd(f64, x, dout)) < 1e-4


def test_covpool_backward(mode):
    rng = np.random.default_rng(4)
    x = features(rng, (2, 5, 3, 3))
    dout = rng.standard_normal((2, 5, 5))  # not symmetric: the backward must use G + G^T
    _check_grad(CovPool(), PlainCovPool(), np_cov, x, dout)


@pytest.mark.parametrize("iter_num", [1, 2, 5])
def test_sqrtm_backward(mode, iter_num):
    rng = np.random.default_rng(5 + iter_num)
    a = spd(rng, 2, 5)
    dout = rng.standard_normal((2, 5, 5))
    _check_grad(Sqrtm(iter_num), PlainSqrtm(iter_num), lambda v: np_sqrtm(v, iter_num), a, dout)


@pytest.mark.parametrize("iter_num", [1, 3])
def test_sqrtm_backward_non_symmetric_input(mode, iter_num):
    """The fast-MPN-COV backward was wrong here (its PR #7); exact reverse mode is not."""
    rng = np.random.default_rng(9)
    a = spd(rng, 2, 5) + 0.05 * rng.standard_normal((2, 5, 5))
    assert np.abs(a - a.transpose(0, 2, 1)).max() > 0.01
    dout = rng.standard_normal((2, 5, 5))
    _check_grad(Sqrtm(iter_num), PlainSqrtm(iter_num), lambda v: np_sqrtm(v, iter_num), a, dout)


def test_triuvec_backward(mode):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((2, 4, 4))
    dout = rng.standard_normal((2, 10))
    _check_grad(TriuVec(), PlainTriuVec(), np_triu, a, dout)


def test_isqrtcov_chain_backward(mode):
    rng = np.random.default_rng(11)
    x = features(rng, (2, 4, 3, 3))
    dout = rng.standard_normal((2, 10))
    _check_grad(ISqrtCov(4, dimension_reduction=None, iter_num=5), PlainISqrt(5),
                lambda v: np_isqrt(v, 5), x, dout)


def test_dimension_reduction_receives_gradient(mode):
    rng = np.random.default_rng(12)
    net = ISqrtCov(6, dimension_reduction=4, iter_num=3)
    x = Tensor(rng.standard_normal((3, 6, 4, 4)).astype(np.float32))
    dout = Tensor(rng.standard_normal((3, 10)).astype(np.float32))
    grads = ops.GradOperation(get_by_list=True, sens_param=True)(net, net.trainable_params())(x, dout)
    gw = grads[0].asnumpy()
    assert net.trainable_params()[0].name.endswith("layer_reduce.weight")
    assert np.isfinite(gw).all() and np.abs(gw).max() > 0


# ---------------------------------------------------------------- matrix products: no recomputation

class _Counter:
    """Stands in for a BatchMatMul primitive in PyNative mode and counts d x d x d products."""

    def __init__(self, prim, log):
        self.prim, self.log = prim, log

    def __call__(self, a, b):
        if a.ndim == 3 and a.shape[1] == a.shape[2] == b.shape[1] == b.shape[2]:
            self.log.append(a.shape)
        return self.prim(a, b)


@pytest.mark.parametrize("iter_num", [1, 2, 5])
def test_product_count_forward_and_backward(pynative, iter_num):
    """The same construct/bprop code runs in both modes; PyNative lets us count its products."""
    net = Sqrtm(iter_num)
    log = []
    fn = net.fn
    names = sorted(k for k in dir(fn) if isinstance(getattr(fn, k, None), ops.BatchMatMul))
    assert names, "no BatchMatMul primitive found on the Newton-Schulz cell"
    for k in names:
        object.__setattr__(fn, k, _Counter(getattr(fn, k), log))
    a = spd(np.random.default_rng(13), 2, 6)
    run(net, a)
    forward = len(log)
    log.clear()
    ops.GradOperation(sens_param=True)(net)(Tensor(a.astype(np.float32)), Tensor(np.ones((2, 6, 6), np.float32)))
    assert forward == num_products(iter_num)
    assert len(log) == 3 * num_products(iter_num)  # the forward once, then 2x its products


# ---------------------------------------------------------------- numerics and bad input

def test_zero_input_finite_output_and_gradient(mode):
    x = np.zeros((2, 5, 3, 3))
    dout = np.random.default_rng(14).standard_normal((2, 15))
    net = ISqrtCov(5, dimension_reduction=None, iter_num=5)
    out = run(net, x)
    assert np.isfinite(out).all() and np.abs(out).max() == 0
    assert np.isfinite(vjp(net, x, dout)).all()
    assert np.isfinite(vjp(Sqrtm(5), np.zeros((2, 5, 5)), np.ones((2, 5, 5)))).all()


def test_float16_input_computed_in_float32(mode):
    rng = np.random.default_rng(15)
    x16 = features(rng, (2, 6, 4, 4)).astype(np.float16)
    net = ISqrtCov(6, dimension_reduction=None, iter_num=5)
    out = net(Tensor(x16))
    assert out.dtype == ms.float16
    out32 = run(net, x16.astype(np.float32))
    # Rounding the float32 result once: within one float16 ulp of it.
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), out32, rtol=1e-3, atol=1e-4)
    assert rel(out.asnumpy(), np_isqrt(x16.astype(np.float64), 5)) < 2e-3
    g = VJP(net)(Tensor(x16), Tensor(rng.standard_normal((2, 21)).astype(np.float16)))
    assert g.dtype == ms.float16 and np.isfinite(g.asnumpy()).all()
    for cell, shape in ((CovPool(), (2, 3, 2, 2)), (Sqrtm(2), (2, 3, 3)), (TriuVec(), (2, 3, 3))):
        assert cell(Tensor(np.ones(shape, np.float16))).dtype == ms.float16


@pytest.mark.parametrize("cell, shape", [
    (CovPool(), (2, 3, 4)), (CovPool(), (1, 2, 3, 4, 5)),
    (Sqrtm(), (2, 3, 4)), (Sqrtm(), (3, 3)),
    (TriuVec(), (2, 3, 4)), (TriuVec(), (4,)),
])
def test_bad_shapes_raise_value_error_naming_the_shape(mode, cell, shape):
    with pytest.raises(ValueError, match=r"\(" + r",\s*".join(str(s) for s in shape)):
        cell(Tensor(np.ones(shape, np.float32)))


def test_bad_iter_num():
    for bad in (0, 2.5, -1):
        with pytest.raises(ValueError, match="iter_num"):
            Sqrtm(bad)


@pytest.mark.parametrize("scale, dtype, shape", [
    (1e4, np.float32, (2, 12, 4, 4)),
    (1e-6, np.float32, (2, 12, 4, 4)),
    (1.0, np.float32, (2, 32, 3, 3)),     # rank-deficient: 9 positions, 32 channels
    (1e2, np.float16, (2, 32, 3, 3)),
    (1e-3, np.float16, (2, 12, 4, 4)),
])
def test_stress_inputs_give_finite_outputs_and_gradients(scale, dtype, shape):
    """Issue 6: very large / very small activations, rank-deficient covariance, float16."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(16)
    x = features(rng, shape, scale).astype(dtype)
    c = shape[1]
    net = ISqrtCov(c, dimension_reduction=None, iter_num=5)
    out = net(Tensor(x)).asnumpy()
    assert np.isfinite(out).all()
    tol = 1e-4 if dtype == np.float32 else 5e-3
    assert rel(out, np_isqrt(x.astype(np.float64), 5)) < tol
    g = VJP(net)(Tensor(x), Tensor(rng.standard_normal((shape[0], c * (c + 1) // 2)).astype(dtype)))
    assert np.isfinite(g.asnumpy()).all()
    if dtype == np.float32:
        dout = rng.standard_normal((shape[0], c * (c + 1) // 2))
        assert rel(vjp(net, x, dout), vjp(PlainISqrt(5), x, dout).astype(np.float64)) < 1e-3


# ---------------------------------------------------------------- benchmark smoke test

def test_benchmark_script_runs_on_a_tiny_size(tmp_path):
    out = tmp_path / "meta_layer.json"
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "meta_layer.py"), "--batch", "2", "--dim", "6",
         "--hw", "3", "--iter_num", "3", "--repeats", "2", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) >= {"config", "products", "gflop_per_step", "matmul", "methods", "ratios", "targets_met"}
    assert res["products"] == {"forward": 6, "backward": 12}
    assert set(res["methods"]) == {"ms_explicit", "ms_autodiff", "ms_autodiff_naive", "ms_svd",
                                   "torch_ns", "torch_eigh"}
    for name, m in res["methods"].items():
        assert m["median_ms"] > 0 and len(m["times_ms"]) == 2, name
    for name in ("ms_explicit", "ms_autodiff", "ms_autodiff_naive", "torch_ns"):
        assert res["methods"][name]["finite"] and res["methods"][name]["gflops"] > 0
        if name != "ms_explicit":  # every implementation of the iteration computes the same gradient
            assert res["methods"][name]["grad_rel_diff_vs_explicit"] < 1e-4, name
    assert res["matmul"]["gflops"] > 0
    assert 0 < res["multi_thread_tail_ms"] < 50  # the tail that keeps the graphs on the actor threads
    assert {"explicit_over_torch_ns", "explicit_over_ms_autodiff",
            "explicit_fraction_of_matmul_rate"} <= set(res["ratios"])
    assert "ms_explicit" in proc.stdout
