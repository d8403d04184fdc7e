"""Tests of the square-root methods of src/isqrt_cov.py and src/matfn/ against independent references.

References: float64 NumPy implementations written here from the papers, central finite differences
of them, and MindSpore autodiff of the same forwards written without any bprop.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.isqrt_cov import InvSqrtm, TRACE_EPS, num_products
from tests.test_isqrt_cov import (_Counter, central_fd, mode, pynative, rel, run, spd, vjp)  # noqa: F401


# ---------------------------------------------------------------- Newton-Schulz inverse square root

def np_inv_sqrtm(a, iter_num):
    """iSICE's iteration: Y0 = A/tr(A), Z0 = I, T = (3I - ZY)/2, Y <- YT, Z <- TZ (the last step Z
    only), then Z_N / sqrt(tr A)."""
    eye = np.eye(a.shape[-1])
    norm = np.trace(a, axis1=1, axis2=2)[:, None, None] + TRACE_EPS
    y, z = a / norm, np.broadcast_to(eye, a.shape)
    for k in range(1, iter_num + 1):
        t = (3 * eye - z @ y) / 2
        y, z = (y @ t if k < iter_num else None), t @ z
    return z / np.sqrt(norm)


class PlainInvSqrtm(nn.Cell):
    """The same iteration for MindSpore autodiff (no bprop), Z0 = I multiplied literally."""

    def __init__(self, iter_num):
        super().__init__()
        self.iter_num = iter_num

    def construct(self, a):
        eye = Tensor(np.eye(a.shape[-1], dtype=np.float32))
        norm = (a * eye).sum(axis=(1, 2), keepdims=True) + TRACE_EPS
        y = a / norm
        z = eye
        for k in range(1, self.iter_num + 1):
            t = (3.0 * eye - ops.matmul(z, y)) / 2.0
            if k < self.iter_num:
                y = ops.matmul(y, t)
            z = ops.matmul(t, z)
        return z / ops.sqrt(norm)


@pytest.mark.parametrize("iter_num", [1, 2, 3, 7])
def test_inv_sqrtm_forward_matches_numpy(mode, iter_num):
    a = spd(np.random.default_rng(20 + iter_num), 2, 6)
    assert rel(run(InvSqrtm(iter_num), a), np_inv_sqrtm(a, iter_num)) < 1e-5
    if iter_num == 1:  # the closed form of the brief: (3I - A/tr A) / (2 sqrt(tr A))
        tr = np.trace(a, axis1=1, axis2=2)[:, None, None]
        assert rel(run(InvSqrtm(1), a), (3 * np.eye(6) - a / tr) / (2 * np.sqrt(tr))) < 1e-6


def test_inv_sqrtm_converges_to_the_eigendecomposition_inverse_root(mode):
    rng = np.random.default_rng(30)
    q, _ = np.linalg.qr(rng.standard_normal((3, 8, 8)))
    lam = rng.uniform(1.0, 3.0, (3, 8))
    a = q @ (lam[:, :, None] * q.transpose(0, 2, 1))
    z = run(InvSqrtm(20), (a + a.transpose(0, 2, 1)) / 2)
    assert rel(z, q @ (lam[:, :, None] ** -0.5 * q.transpose(0, 2, 1))) < 1e-4


@pytest.mark.parametrize("iter_num, symmetric", [(1, True), (2, True), (3, True), (5, True), (2, False), (4, False)])
def test_inv_sqrtm_backward(mode, iter_num, symmetric):
    """Exact reverse mode: equal to finite differences of the float64 iteration and to MindSpore
    autodiff of the plain forward, for non-symmetric inputs too."""
    rng = np.random.default_rng(40 + iter_num)
    a = spd(rng, 2, 5)
    if not symmetric:
        a = a + 0.05 * rng.standard_normal((2, 5, 5))
    dout = rng.standard_normal((2, 5, 5))
    g = vjp(InvSqrtm(iter_num), a, dout)
    assert np.isfinite(g).all()
    assert rel(g, vjp(PlainInvSqrtm(iter_num), a, dout).astype(np.float64)) < 1e-4
    assert rel(g, central_fd(lambda v: np_inv_sqrtm(v, iter_num), a, dout)) < 1e-4


@pytest.mark.parametrize("iter_num", [1, 2, 5])
def test_inv_sqrtm_product_count(pynative, iter_num):
    net = InvSqrtm(iter_num)
    log = []
    for k in [k for k in dir(net.fn) if isinstance(getattr(net.fn, k, None), ops.BatchMatMul)]:
        object.__setattr__(net.fn, k, _Counter(getattr(net.fn, k), log))
    a = spd(np.random.default_rng(50), 2, 6)
    run(net, a)
    assert len(log) == num_products(iter_num, inverse=True) == (0 if iter_num == 1 else 3 * iter_num - 3)
    log.clear()
    ops.GradOperation(sens_param=True)(net)(Tensor(a.astype(np.float32)), Tensor(np.ones((2, 6, 6), np.float32)))
    assert len(log) == 3 * num_products(iter_num, inverse=True)


def test_inv_sqrtm_zero_input_and_dtype(mode):
    out = run(InvSqrtm(3), np.zeros((2, 4, 4)))
    g = vjp(InvSqrtm(3), np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    assert np.isfinite(out).all() and np.isfinite(g).all()
    a16 = spd(np.random.default_rng(51), 2, 4).astype(np.float16)
    out16 = InvSqrtm(3)(Tensor(a16))
    assert out16.dtype == ms.float16
    assert rel(out16.asnumpy(), np_inv_sqrtm(a16.astype(np.float64), 3)) < 2e-3
    with pytest.raises(ValueError, match="iter_num"):
        InvSqrtm(0)
    with pytest.raises(ValueError, match=r"\(2,\s*3,\s*4\)"):
        InvSqrtm(2)(Tensor(np.ones((2, 3, 4), np.float32)))
