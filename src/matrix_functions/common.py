"""Pieces every matrix function shares: dtype handling, checks, per-sample reductions, covariance.

Shapes: matrices are (B, d, d) batches; feature maps (B, C, H, W) with M = H*W positions.
"""
import mindspore as ms
from mindspore import ops

# Added to a normaliser (trace or Frobenius norm) before dividing by it: an all-zero map then gives
# zeros and finite gradients. Tiny enough not to bias small but genuine activations (trace ~1e-10).
TRACE_EPS = 1e-20


def to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def restore(y, dtype):
    return y if dtype == ms.float32 else ops.cast(y, dtype)


def frobenius(u, v):
    """Per-sample <u, v> = sum(u * v) as (B, 1, 1); a flat reduction (multi-axis ReduceSum is slow on CPU)."""
    b = u.shape[0]
    return (u * v).reshape(b, -1).sum(axis=1).reshape(b, 1, 1)


def check_square(name, x):
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} expects square matrices (B, d, d), got shape {x.shape}")


def check_feature_map(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (B, C, H, W) feature map, got shape {x.shape}")


def check_iter_num(name, iter_num):
    if int(iter_num) != iter_num or iter_num < 1:
        raise ValueError(f"{name} iter_num must be an integer >= 1, got {iter_num!r}")
    return int(iter_num)


def divide(t, m):
    """t / m for an int m: a scalar multiply by 1/m in float32 (cheaper than Div); an exact Div in
    float64, since MindSpore rounds a Python float operand to float32 first (1/49 is 4e-10 off)."""
    return t / m if t.dtype == ms.float64 else t * (1.0 / m)


def centred(x, mm):
    """The (B, C, H, W) map as (B, C, M) with each channel's mean over the M positions removed. The mean
    is a batched matrix-vector product (MindSpore's ReduceMean is several times slower on CPU)."""
    b, c, h, w = x.shape
    m = h * w
    xr = x.reshape(b, c, m)
    ones = ops.broadcast_to(divide(ops.ones((1, m, 1), x.dtype), m), (b, m, 1))
    return xr - mm(xr, ones)


def centred_covariance(x, mm, mm_tb):
    """Sigma = X Ihat X^T with Ihat = (I - 11^T/M)/M for a (B, C, H, W) map of any float dtype.

    Returns (Sigma (B, C, C), centred X (B, C, M)): the backward reuses the centred X.
    ``mm``/``mm_tb``: BatchMatMul primitives of the caller."""
    b, c, h, w = x.shape
    xc = centred(x, mm)
    return divide(mm_tb(xc, xc), h * w), xc


def covariance_backward(g, xc, shape, mm):
    """dl/dX = (G + G^T) X Ihat for G = dl/dSigma; X Ihat is the centred X divided by M."""
    b, c, h, w = shape
    dx = divide(mm(g + g.transpose(0, 2, 1), xc), h * w)
    return dx.reshape(b, c, h, w)
