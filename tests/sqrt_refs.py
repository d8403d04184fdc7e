"""Float64 NumPy/SciPy references of the square-root methods, written from the papers (not from the
code under test): Song, Sebe, Wang, ICLR 2022 (MTP-Lya, MPA-Lya) and ICCV 2021 (SVD-Pade)."""
import numpy as np
from scipy.special import binom

TAYLOR_DEGREE, PADE_ORDER, LYA_STEPS = 10, 5, 8


def taylor_sqrt_1mz(degree=TAYLOR_DEGREE):
    """a_k of sqrt(1 - z) = sum_k a_k z^k in closed form: (-1)^k binom(1/2, k)."""
    return np.array([(-1) ** k * binom(0.5, k) for k in range(degree + 1)])


def pade_from_taylor(a, m, n):
    """[m/n] Pade (p, q), q_0 = 1, from the linear equations sum_j q_j a_{k-j} = 0 for k = m+1..m+n."""
    rows = np.array([[a[k - j] if k - j >= 0 else 0.0 for j in range(1, n + 1)] for k in range(m + 1, m + n + 1)])
    q = np.concatenate([[1.0], np.linalg.solve(rows, -a[m + 1:m + n + 1])])
    p = np.array([sum(q[j] * a[k - j] for j in range(0, min(k, n) + 1)) for k in range(m + 1)])
    return p, q


def _poly(coeffs, x):
    eye = np.broadcast_to(np.eye(x.shape[-1]), x.shape)
    out, xk = coeffs[0] * eye, eye
    for c in coeffs[1:]:
        xk = xk @ x
        out = out + c * xk
    return out


def frobenius_norm(a):
    return np.sqrt((a * a).sum(axis=(1, 2)))[:, None, None]


def mtp(a):
    """MTP: sqrt(||A||_F) sum_k a_k (I - A/||A||_F)^k."""
    norm = frobenius_norm(a)
    return _poly(taylor_sqrt_1mz(), np.eye(a.shape[-1]) - a / norm) * np.sqrt(norm)


def mpa(a):
    """MPA: sqrt(||A||_F) Q^-1 P of the [5/5] Pade approximant of sqrt(1 - z) at I - A/||A||_F."""
    norm = frobenius_norm(a)
    x = np.eye(a.shape[-1]) - a / norm
    p, q = pade_from_taylor(taylor_sqrt_1mz(), PADE_ORDER, PADE_ORDER)
    return np.linalg.solve(_poly(q, x), _poly(p, x)) * np.sqrt(norm)


def lyapunov_grad(root, norm, g, steps=LYA_STEPS):
    """The papers' backward: coupled sign iteration from B = root/sqrt(norm), C = G/sqrt(norm); C/2."""
    eye = np.eye(g.shape[-1])
    b, c = root / np.sqrt(norm), g / np.sqrt(norm)
    for _ in range(steps):
        b2 = b @ b
        c = 0.5 * (c @ (3 * eye - b2) - b2 @ c + b @ c @ b)
        b = 0.5 * b @ (3 * eye - b2)
    return 0.5 * c


def covariance(x):
    b, c = x.shape[:2]
    xc = x.reshape(b, c, -1)
    xc = xc - xc.mean(axis=2, keepdims=True)
    return xc @ xc.transpose(0, 2, 1) / xc.shape[2], xc


def eig_sqrt(sigma, eps=np.finfo(np.float64).eps):
    """SVD-Pade's forward on a float64 covariance: (V diag(s)^1/2 V^T, V, s), s = max(|lambda|, eps)."""
    lam, v = np.linalg.eigh(sigma)
    s = np.maximum(np.abs(lam), eps)
    return (v * np.sqrt(s)[:, None, :]) @ v.transpose(0, 2, 1), v, s


def _clamp_inf(x):
    finite = x[np.isfinite(x)]
    x = np.where(x == np.inf, finite.max(), x)
    return np.where(x == -np.inf, finite.min(), x)


def svd_pade_grad(v, s, g, xc, f, shape):
    """SVD-Pade's backward (ICCV 2021, Sec. 4 and the authors' clamping) from the decomposition (V, s),
    dl/d(root) = g and the centred features xc (B, C, M): dl/dX of the given (B, C, H, W) shape. ``f(x)`` ~ 1/(1 - x) on [0, 1] is the Pade
    approximant; K_ij = f(min(s_i/s_j, s_j/s_i)) / max(s_i, s_j) * sign, i.e. ~1/(s_i - s_j)."""
    si, sj = s[:, :, None], s[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(si >= sj, 1 / si, -1 / sj) * f(np.minimum(si / sj, sj / si))
    k[:, np.arange(s.shape[1]), np.arange(s.shape[1])] = 0
    k = _clamp_inf(k)
    root = np.sqrt(s)
    dv = (g + g.transpose(0, 2, 1)) @ v * root[:, None, :]
    ds = 0.5 * np.einsum("bij,bik,bkj->bj", v, g, v) / root
    inner = _clamp_inf(k.transpose(0, 2, 1) * (v.transpose(0, 2, 1) @ dv) + ds[:, :, None] * np.eye(s.shape[1]))
    ga = _clamp_inf(v @ inner @ v.transpose(0, 2, 1))
    dx = _clamp_inf((ga + ga.transpose(0, 2, 1)) @ xc / xc.shape[2])
    return np.nan_to_num(dx, nan=0.0, posinf=np.inf, neginf=-np.inf).reshape(shape)
