"""The matrix square roots of src/matrix_functions against independent references: float64 NumPy/SciPy
implementations written from the papers (tests/sqrt_refs.py), central finite differences of them, and
MindSpore autodiff of the same forwards written here without any bprop. Inputs: covariances of full
rank, rank-deficient ones (M < d positions, as 7x7 maps with d = 256 are) and zero.

Where the authors' backward is deliberately not the derivative of their forward (MTP-Lya, MPA-Lya),
the tests check it equals their definition and measure how far it is from the true gradient.
"""
import numpy as np
import pytest
import scipy.linalg
import mindspore as ms
from mindspore import nn, ops, Tensor

from src.isqrt_cov import InvSqrtm, TRACE_EPS, num_products
from src.matrix_functions import MPALya, MTPLya, SvdPade, lyapunov
from src.matrix_functions.svd_pade import EPS64, geometric_pade_coefficients
from tests import sqrt_refs as R
from tests.test_isqrt_cov import (_Counter, PlainSqrtm, central_fd, mode, np_sqrtm, pynative, rel, run,  # noqa: F401
                                  spd, vjp)


# ---------------------------------------------------------------- Newton-Schulz inverse square root

def np_inv_sqrtm(a, iter_num):
    return np_sqrtm(a, iter_num, inverse=True)


def PlainInvSqrtm(iter_num):  # noqa: N802 (a Cell factory)
    return PlainSqrtm(iter_num, inverse=True)


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


# ---------------------------------------------------------------- inputs

def _relu_features(rng, shape):
    return np.maximum(rng.standard_normal(shape), 0) + 0.05 * rng.random(shape)


def features(kind, rng, d=6):
    """(B, d, H, W) float32-representable features: "full" (M = 48 > d), "rankdef" (7x7 = 49 positions,
    d = 64 channels), "zero"."""
    shape = {"full": (2, d, 6, 8), "rankdef": (2, 64, 7, 7), "zero": (2, d, 3, 3)}[kind]
    x = np.zeros(shape) if kind == "zero" else _relu_features(rng, shape)
    return x.astype(np.float32).astype(np.float64)


def covariance(kind, rng, d=6):
    return R.covariance(features(kind, rng, d))[0].astype(np.float32).astype(np.float64)


KINDS = ("full", "rankdef", "zero")
LYA = {"mtp_lya": (MTPLya, R.mtp, False), "mpa_lya": (MPALya, R.mpa, True)}


# ---------------------------------------------------------------- coefficients

def test_taylor_and_pade_coefficients_are_derived_exactly():
    """mpmath's derivation (the module's) against the closed form (-1)^k binom(1/2, k) and the Pade
    linear equations solved in NumPy; q(z) > 0 on [0, 1], so Q is SPD for SPD input."""
    a, p, q = lyapunov.sqrt_coefficients()
    ra = R.taylor_sqrt_1mz()
    rp, rq = R.pade_from_taylor(ra, 5, 5)
    np.testing.assert_allclose(a, ra, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(p, rp, rtol=1e-11)
    np.testing.assert_allclose(q, rq, rtol=1e-11)
    z = np.linspace(0, 1, 1001)
    assert np.polyval(q[::-1], z).min() > 0.01
    # The Pade approximant is the better one at the spectrum's low end, as the paper argues.
    assert abs(np.polyval(p[::-1], 0.9) / np.polyval(q[::-1], 0.9) - np.sqrt(0.1)) < 1e-3 < \
        abs(np.polyval(a[::-1], 0.9) - np.sqrt(0.1))


def _authors_pade(x):
    """f = P/Q of SVD-Pade, summed as the authors' loop does (power by power)."""
    p, q = geometric_pade_coefficients()
    pv, qv, xk = np.full_like(x, p[0]), np.full_like(x, q[0]), np.ones_like(x)
    for k in range(1, len(p)):
        xk = xk * x
        pv, qv = pv + p[k] * xk, qv + q[k] * xk
    with np.errstate(divide="ignore", invalid="ignore"):
        return pv / qv


def test_svd_pade_approximant_is_the_geometric_series_itself():
    """The finding of src/matrix_functions/svd_pade.py: the [50/50] Pade approximant of 1/(1 - x) is
    1/(1 - x) (to 4e-10 on [0, 1) in float64) with its pole at x = 1 (Q(1) sums to exactly 0)."""
    x = np.linspace(0, 1, 20001)[:-1]
    assert np.abs(_authors_pade(x) * (1 - x) - 1).max() < 1e-9
    assert np.isinf(_authors_pade(np.ones(1))).all()


# ---------------------------------------------------------------- MTP-Lya, MPA-Lya

class PlainLya(nn.Cell):
    """The MTP / MPA forward for MindSpore autodiff (no bprop; Q^-1 by MatrixInverse, which has one)."""

    def __init__(self, pade):
        super().__init__()
        self.pade = pade
        self.a = [float(v) for v in R.taylor_sqrt_1mz()]
        p, q = R.pade_from_taylor(R.taylor_sqrt_1mz(), 5, 5)
        self.p, self.q = [float(v) for v in p], [float(v) for v in q]
        self.inv = ops.MatrixInverse()

    def poly(self, coeffs, x, eye):
        out, xk = eye * coeffs[0], eye
        for c in coeffs[1:]:
            xk = ops.matmul(xk, x)
            out = out + xk * c
        return out

    def construct(self, a):
        eye = Tensor(np.eye(a.shape[-1], dtype=np.float32))
        norm = ops.sqrt((a * a).sum(axis=(1, 2), keepdims=True)) + TRACE_EPS
        x = eye - a / norm
        if self.pade:
            s = ops.matmul(self.inv(self.poly(self.q, x, eye)), self.poly(self.p, x, eye))
        else:
            s = self.poly(self.a, x, eye)
        return s * ops.sqrt(norm)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(LYA))
def test_lya_forward_and_backward_are_the_authors(mode, name, kind):
    """Forward: the float64 Taylor / Pade formula; backward: the float64 coupled sign iteration of the
    paper (8 steps) from the same output, for dl/dA^1/2 = G. Zero input: finite, no NaN."""
    cell, ref_forward, _ = LYA[name]
    rng = np.random.default_rng(60)
    a = covariance(kind, rng)
    g = rng.standard_normal(a.shape)
    out, grad = run(cell(), a), vjp(cell(), a, g)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    if kind == "zero":
        assert np.abs(out).max() < 1e-9
        return
    ref = ref_forward(a)
    # Rank-deficient MPA: Q's condition number is up to 93, so its float32 Cholesky solve loses ~1e-4.
    assert rel(out, ref) < (3e-4 if kind == "rankdef" else 1e-5)
    assert rel(grad, R.lyapunov_grad(ref, R.frobenius_norm(a), g)) < (5e-4 if kind == "rankdef" else 1e-5)


@pytest.mark.parametrize("name", sorted(LYA))
def test_lya_product_counts(pynative, name):
    """Products performed, counted at the BatchMatMul primitive: what the registry (and the benchmark)
    report. MTP: 5 forward by Paterson-Stockmeyer (the authors' power sums: 9); backward 6 per step."""
    cell, _, pade = LYA[name]
    net = cell()
    log = []
    object.__setattr__(net.fn, "mm", _Counter(net.fn.mm, log))
    a = covariance("full", np.random.default_rng(62))
    run(net, a)
    forward = len(log)
    log.clear()
    vjp(net, a, np.ones(a.shape))
    assert (forward, len(log) - forward) == lyapunov.num_products(pade) == ((4, 47) if pade else (5, 47))


# Relative distance of the Lyapunov backward to the true gradient of the forward (finite differences
# of the float64 formula), measured here: (low, high) bounds around the measured value.
TRUE_GRADIENT_DISTANCE = {("mtp_lya", "full"): (0.01, 0.1),      # 0.039: the degree-10 series is 1.5% off
                          ("mpa_lya", "full"): (2e-4, 5e-3),     # 0.0009
                          ("mtp_lya", "rankdef"): (0.2, 0.8),    # 0.44: no convergence on the null space
                          ("mpa_lya", "rankdef"): (0.2, 0.8)}    # 0.43


@pytest.mark.parametrize("kind", ["full", "rankdef"])
@pytest.mark.parametrize("name", sorted(LYA))
def test_lya_backward_distance_to_the_true_gradient(name, kind):
    """The true gradient two ways (MindSpore autodiff of the plain forward, finite differences of the
    float64 formula) agree; the authors' Lyapunov backward is as far from it as measured. On full rank
    it is close to the exact Lyapunov solution (SciPy), so the gap is the forward's approximation."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell, ref_forward, pade = LYA[name]
    rng = np.random.default_rng(61)
    a = covariance("full", rng) if kind == "full" else R.covariance(_relu_features(rng, (2, 12, 5, 1)))[0]
    a = a.astype(np.float32).astype(np.float64)
    g = rng.standard_normal(a.shape)
    true = central_fd(ref_forward, a, g)
    assert rel(vjp(PlainLya(pade), a, g), true) < 1e-3
    grad = vjp(cell(), a, g)
    low, high = TRUE_GRADIENT_DISTANCE[(name, kind)]
    assert low < rel(grad, true) < high
    if kind == "full":
        exact = np.stack([scipy.linalg.solve_continuous_lyapunov(scipy.linalg.sqrtm(ai).real, gi)
                          for ai, gi in zip(a, g)])
        assert rel(grad, exact) < rel(grad, true) / 2


# ---------------------------------------------------------------- SVD-Pade

class PlainSvdSqrt(nn.Cell):
    """The exact root for MindSpore autodiff: float64 covariance, batched ops.svd, V diag(s)^1/2 V^T."""

    def construct(self, x):
        b, c, h, w = x.shape
        xr = ops.cast(x, ms.float64).reshape(b, c, h * w)
        xc = xr - xr.mean(axis=2, keep_dims=True)
        s, _, v = ops.svd(ops.matmul(xc, xc.transpose(0, 2, 1)) / (h * w))
        return ops.cast(ops.matmul(v * ops.sqrt(s).expand_dims(1), v.transpose(0, 2, 1)), ms.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_svd_pade_forward_and_backward_are_the_authors(kind):
    """Forward: float64 eigendecomposition root (NumPy); backward: the paper's eigen backward with the
    Pade K and the authors' clamping, in NumPy from the decomposition the forward computed (null-space
    eigenvalues are rounding noise, different in every LAPACK). GRAPH_MODE for the rank-deficient case
    (its graph takes ~20 s to compile), PYNATIVE_MODE for the others."""
    ms.set_context(mode=ms.GRAPH_MODE if kind == "rankdef" else ms.PYNATIVE_MODE)
    rng = np.random.default_rng(70)
    x = features(kind, rng)
    g = rng.standard_normal((x.shape[0], x.shape[1], x.shape[1]))
    ref, _, _ = R.eig_sqrt(R.covariance(x)[0])
    out, grad = run(SvdPade(), x), vjp(SvdPade(), x, g)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    assert np.abs(out - ref).max() <= 1e-6 * max(np.abs(ref).max(), 1e-2)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    saved = [t.asnumpy().astype(np.float64) for t in SvdPade().fn(Tensor(x.astype(np.float32)))[1:]]
    ms.set_context(mode=ms.GRAPH_MODE)
    v, s = saved[0] + saved[1], saved[2] + saved[3]  # float64 V and s, saved as float32 pairs
    assert np.abs(v @ v.transpose(0, 2, 1) - np.eye(v.shape[1])).max() < 1e-13
    expected = R.svd_pade_grad(v, s, g, R.covariance(x)[1], _authors_pade, x.shape)
    assert np.abs(grad - expected).max() <= 1e-6 * max(np.abs(expected).max(), 1e-2)
    if kind == "zero":  # every s clamped at eps: all ties, K entirely from the Inf clamp
        assert (s == EPS64).all() and np.abs(grad).max() == 0
    if kind == "rankdef":  # the clamp is exercised: several singular values tie at eps
        assert (s == EPS64).sum() >= 2


def test_svd_pade_backward_is_the_true_gradient_on_distinct_eigenvalues():
    """Away from ties the Pade K is 1/(s_i - s_j): the backward equals finite differences of the exact
    float64 root and MindSpore autodiff of a plain SVD root."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(71)
    x = features("full", rng, d=5)
    g = rng.standard_normal((2, 5, 5))
    grad = vjp(SvdPade(), x, g)
    true = central_fd(lambda z: R.eig_sqrt(R.covariance(z)[0])[0], x, g, h=1e-5)
    assert rel(grad, true) < 1e-6
    assert rel(grad, vjp(PlainSvdSqrt(), x, g)) < 1e-5
    ms.set_context(mode=ms.GRAPH_MODE)


# ---------------------------------------------------------------- non-finite input

@pytest.mark.parametrize("cell", [MTPLya, MPALya, SvdPade, InvSqrtm])
def test_non_finite_input_gives_non_finite_output_not_an_error(cell):
    """A NaN and an Inf sample (MindSpore's CPU Cholesky raises on one; eigensolvers may) flow through as
    non-finite values, which the training step detects and skips; the clean sample is unaffected."""
    ms.set_context(mode=ms.GRAPH_MODE)
    x = features("full", np.random.default_rng(80))
    x = np.concatenate([x, x[:1]])
    if cell is not SvdPade:
        x = R.covariance(x)[0]
    clean = run(cell(), x[:1].repeat(3, axis=0))
    x[1, 0, 0], x[2, 0, 0] = np.nan, np.inf
    out = run(cell(), x)
    grad = vjp(cell(), x, np.ones(out.shape))
    assert not np.isfinite(out[1]).all() and not np.isfinite(out[2]).all()
    np.testing.assert_array_equal(out[0], clean[0])
    assert grad.shape == x.shape
