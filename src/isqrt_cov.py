"""iSQRT-COV meta-layer (Li et al., CVPR 2018) as MindSpore Cells with hand-written backward passes.

Pipeline: ``CovPool`` (B, C, H, W) -> (B, C, C); ``Sqrtm`` trace pre-normalisation, coupled
Newton-Schulz iteration and post-compensation; ``TriuVec`` upper triangle -> (B, C(C+1)/2).

Why explicit ``bprop``: the forwards return, besides their result, what their backward reads
(the centred features; A, T_1 and, for every later step, Y_{k-1}, Z_{k-1}, T_k), so the backward
performs only matrix products, 2 per forward product (24 for iter_num=5, after the forward's
12: Z_0 = I is never multiplied), and never recomputes the iteration. The backward is the
exact reverse of the forward, transposes included, so it is also correct for non-symmetric
inputs and for iter_num=1 (both were bugs of the PyTorch reference).

Speed on CPU (bench/meta_layer.py): the iteration runs on (-Y/2, Z) so that every T costs one
add and no scalar multiply; backward gradients are kept transposed so that nearly all products
are plain BatchMatMuls (transpose_b is ~10% slower); means, traces and inner products avoid
MindSpore's slow multi-axis reductions and broadcast ops.

Every Cell computes in float32 and returns its input's dtype (mixed precision keeps the
meta-layer in float32).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.common.initializer import HeNormal

# Added to the trace before dividing by it: an all-zero map (trace 0) then gives zeros and
# finite gradients. Tiny enough not to bias small but genuine activations (trace ~1e-10).
TRACE_EPS = 1e-20


def num_products(iter_num, inverse=False):
    """Matrix products (d x d x d) of the forward Newton-Schulz iteration: 1 + 3(N-2) + 2 (square
    root and inverse alike; N = 1 costs 1 product for the square root, none for the inverse)."""
    if iter_num == 1:
        return 0 if inverse else 1
    return 3 * iter_num - 3


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def _restore(y, dtype):
    return y if dtype == ms.float32 else ops.cast(y, dtype)


class _CovPoolFn(nn.Cell):
    """Sigma = X Ihat X^T with Ihat = (I - 11^T/M)/M, on float32 (B, C, H, W).

    Returns (Sigma, centred X): the backward reuses the centred X instead of recomputing it.
    The mean is a batched matrix-vector product (MindSpore's ReduceMean is several times slower
    on CPU) and 1/M a scalar multiply (cheaper than Div)."""

    def __init__(self):
        super().__init__()
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.mm = ops.BatchMatMul()

    def construct(self, x):
        b, c, h, w = x.shape
        m = h * w
        xr = x.reshape(b, c, m)
        ones = ops.broadcast_to(ops.ones((1, m, 1), ms.float32) * (1.0 / m), (b, m, 1))
        xc = xr - self.mm(xr, ones)
        return self.mm_tb(xc, xc) * (1.0 / m), xc

    def bprop(self, x, out, dout):
        # dl/dX = (G + G^T) X Ihat, and X Ihat is the centred X divided by M.
        b, c, h, w = x.shape
        g = dout[0] + dout[0].transpose(0, 2, 1)
        dx = self.mm(g, out[1]) * (1.0 / (h * w))
        return (dx.reshape(b, c, h, w),)


class CovPool(nn.Cell):
    """Global covariance pooling: (B, C, H, W) -> (B, C, C), centred and divided by M = H*W."""

    def __init__(self):
        super().__init__()
        self.fn = _CovPoolFn()

    def construct(self, x):
        if x.ndim != 4:
            raise ValueError(f"CovPool expects a (B, C, H, W) feature map, got shape {x.shape}")
        return _restore(self.fn(_to_float32(x))[0], x.dtype)


def _frobenius(u, v):
    """Per-sample <u, v> = sum(u * v) as (B, 1, 1); a flat reduction (multi-axis ReduceSum is slow on CPU)."""
    b = u.shape[0]
    return (u * v).reshape(b, -1).sum(axis=1).reshape(b, 1, 1)


class _NewtonSchulzFn(nn.Cell):
    """Pre-normalisation, coupled Newton-Schulz iteration and post-compensation.

    Computed on Yh = -Y/2 and Z: then T = (3I - ZY)/2 = 1.5I + Z Yh, Yh_k = Yh T, Z_k = T Z, and the
    first step is Yh_1 = Ah T_1, Z_1 = T_1 = 1.5I + Ah with Ah = -A/2. Every step forms T with one
    add and the backward needs no scalar multiplies.

    ``inverse`` False (square root): the last step computes only Yh_N, C = -2 sqrt(norm) Yh_N.
    ``inverse`` True (inverse square root): the last step computes only Z_N, C = Z_N / sqrt(norm).

    Returns (C, norm, Ah, T_1, [Yh_1, Z_1, T_2, Yh_2, Z_2, T_3, ...]): the result first, then what
    the backward reads (Yh_{k-1}, Z_{k-1}, T_k for every step k >= 2).
    """

    def __init__(self, iter_num, eps=TRACE_EPS, inverse=False):
        super().__init__()
        self.iter_num = iter_num
        self.eps = eps
        self.inverse = bool(inverse)
        # C = scale * norm^power * (Yh_N or Z_N)
        self.power = -0.5 if self.inverse else 0.5
        self.mm = ops.BatchMatMul()
        self.mm_ta = ops.BatchMatMul(transpose_a=True)
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.mm_tatb = ops.BatchMatMul(transpose_a=True, transpose_b=True)
        self.eye = ops.Eye()

    def construct(self, a):
        b, d, _ = a.shape
        # A (B, d, d) identity: adding a broadcast (d, d) one is 3x slower on CPU.
        eye15 = ops.broadcast_to(self.eye(d, d, ms.float32) * 1.5, (b, d, d))
        norm = ops.diagonal(a, 0, 1, 2).sum(axis=1).reshape(b, 1, 1) + self.eps
        ah = a * (-0.5 / norm)
        t = ah + eye15
        z = t
        y = z if self.inverse and self.iter_num == 1 else self.mm(ah, t)
        saved = (ah, t)
        for k in range(2, self.iter_num + 1):
            t = self.mm(z, y) + eye15
            saved = saved + (y, z, t)
            if k < self.iter_num:
                y, z = self.mm(y, t), self.mm(t, z)
            elif self.inverse:
                z = self.mm(t, z)
            else:
                y = self.mm(y, t)
        if self.inverse:
            c = z * ops.rsqrt(norm)
        else:
            c = y * (-2.0 * ops.sqrt(norm))
        return (c, norm) + saved

    def bprop(self, a, out, dout):
        # Exact reverse mode of construct. Gradients named g* are held transposed (g = dl/dX^T):
        # then every product of steps N-1..2 is a plain BatchMatMul, while D-form gradients would
        # need transpose_b, which is about 10% slower on CPU. The first product switches to the
        # transposed form and the last four switch back (dl/da is returned untransposed).
        b, d, _ = a.shape
        n = self.iter_num
        dc = dout[0]
        norm = out[1]
        ah = out[2]
        t1 = out[3]
        # Post-compensation C = s norm^p W (W = Yh_N or Z_N): dl/dnorm = p <dC, C> / norm.
        dnorm = _frobenius(dc, out[0]) * (self.power / norm)
        if self.inverse:
            dw = dc * ops.rsqrt(norm)
        else:
            dw = dc * (-2.0 * ops.sqrt(norm))
        if n == 1:
            if self.inverse:
                d_ah = dw  # Z_1 = T_1 = 1.5I + Ah
            else:
                d_ah = self.mm_tb(dw, t1) + self.mm_ta(ah, dw)  # Yh_1 = Ah T_1
        else:
            # Reverse of steps N..2: T = 1.5I + Z Y, Y' = Y T, Z' = T Z with (Y, Z) = (Yh_{k-1}, Z_{k-1}):
            # dT = Y^T dY' + dZ' Z^T, dY = dY' T^T + Z^T dT, dZ = T^T dZ' + dT Y^T (transpose these).
            gy = None
            gz = None  # dl/dZ_k^T; at the last step the transposed dZ_N (inverse) or none (square root)
            dz1 = None
            for k in range(n, 1, -1):
                base = 4 + 3 * (k - 2)
                y = out[base]
                z = out[base + 1]
                t = out[base + 2]
                if k < n:
                    gt = self.mm(gy, y) + self.mm(z, gz)
                    gy_prev = self.mm(t, gy) + self.mm(gt, z)
                elif self.inverse:
                    # Only Z_N = T Z: dT = dZ' Z^T, dY = Z^T dT.
                    gt = self.mm_tb(z, dw)
                    gy_prev = self.mm(gt, z)
                else:
                    # Only Yh_N = Y T: dT = Y^T dY', dY = dY' T^T + Z^T dT.
                    gt = self.mm_ta(dw, y)
                    gy_prev = self.mm_tb(t, dw) + self.mm(gt, z)
                # dZ = T^T dZ' + dT Y^T; dZ' is gz^T for k < N, dw (inverse) or 0 (square root) at N.
                if k > 2:
                    if k < n:
                        gz = self.mm(gz, t) + self.mm(y, gt)
                    elif self.inverse:
                        gz = self.mm_ta(dw, t) + self.mm(y, gt)
                    else:
                        gz = self.mm(y, gt)
                elif k < n:
                    dz1 = self.mm_tatb(t, gz) + self.mm_tatb(gt, y)
                elif self.inverse:
                    dz1 = self.mm_ta(t, dw) + self.mm_tatb(gt, y)
                else:
                    dz1 = self.mm_tatb(gt, y)
                gy = gy_prev
            # Step 1: Yh_1 = Ah T_1, Z_1 = T_1, T_1 = 1.5I + Ah; dY_1 = gy^T.
            d_ah = self.mm_tatb(gy, t1) + (self.mm_tatb(ah, gy) + dz1)
        # Pre-normalisation Ah = -a / (2 norm), norm = tr(a) + eps: dAh/dnorm = -Ah / norm.
        dnorm = dnorm - _frobenius(d_ah, ah) / norm
        da = d_ah * (-0.5 / norm) + self.eye(d, d, ms.float32) * dnorm
        return (da,)


def _check_iter_num(name, iter_num):
    if int(iter_num) != iter_num or iter_num < 1:
        raise ValueError(f"{name} iter_num must be an integer >= 1, got {iter_num!r}")
    return int(iter_num)


def _check_square(name, x):
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} expects square matrices (B, d, d), got shape {x.shape}")


class Sqrtm(nn.Cell):
    """Matrix square root of (B, d, d) SPD matrices by iSQRT: trace pre-normalisation,
    ``iter_num`` coupled Newton-Schulz steps, post-compensation by sqrt(trace)."""

    def __init__(self, iter_num=5, eps=TRACE_EPS):
        super().__init__()
        self.iter_num = _check_iter_num("Sqrtm", iter_num)
        self.fn = _NewtonSchulzFn(self.iter_num, eps)

    def construct(self, x):
        _check_square("Sqrtm", x)
        return _restore(self.fn(_to_float32(x))[0], x.dtype)


class InvSqrtm(nn.Cell):
    """Inverse matrix square root of (B, d, d) SPD matrices by the same coupled Newton-Schulz
    iteration: A -> Z_N / sqrt(tr A), with Y_0 = A / tr(A), Z_0 = I, the last step computing only
    Z_N = T_N Z_{N-1} (iSICE's ``Sqrtm``, Rahman et al., CVPR 2023; iter_num = 1 gives
    (3I - A / tr A) / (2 sqrt(tr A))). (B, d, d) -> (B, d, d), in the input's dtype.

    ``eps`` (1e-20) is added to the trace: an all-zero input gives a finite (huge) result, not
    Inf; callers that want a usable inverse add a ridge first, as iSICE does."""

    def __init__(self, iter_num=5, eps=TRACE_EPS):
        super().__init__()
        self.iter_num = _check_iter_num("InvSqrtm", iter_num)
        self.fn = _NewtonSchulzFn(self.iter_num, eps, inverse=True)

    def construct(self, x):
        _check_square("InvSqrtm", x)
        return _restore(self.fn(_to_float32(x))[0], x.dtype)


def triu_indices_flat(d):
    """Flat (row-major) positions of the upper triangle of a d x d matrix, numpy.triu_indices order."""
    rows, cols = np.triu_indices(d)
    return (rows * d + cols).astype(np.int32)


def triu_scatter_index(d):
    """For every flat position of a d x d matrix, its index in the triu vector, or d(d+1)/2 (a
    padding zero) below the diagonal: the backward is then one gather instead of a scatter."""
    inv = np.full(d * d, d * (d + 1) // 2, dtype=np.int32)
    inv[triu_indices_flat(d)] = np.arange(d * (d + 1) // 2, dtype=np.int32)
    return inv


class _TriuVecFn(nn.Cell):
    def construct(self, x):
        b, d, _ = x.shape
        idx = Tensor(triu_indices_flat(d))
        return ops.gather(x.reshape(b, d * d), idx, 1)

    def bprop(self, x, out, dout):
        b, d, _ = x.shape
        inv = Tensor(triu_scatter_index(d))
        padded = ops.concat((dout, ops.zeros((b, 1), dout.dtype)), axis=1)
        return (ops.gather(padded, inv, 1).reshape(b, d, d),)


class TriuVec(nn.Cell):
    """Upper triangle, diagonal included, row-major (numpy.triu_indices order): (B, d, d) -> (B, d(d+1)/2)."""

    def __init__(self):
        super().__init__()
        self.fn = _TriuVecFn()

    def construct(self, x):
        _check_square("TriuVec", x)
        return _restore(self.fn(_to_float32(x)), x.dtype)


class ISqrtCov(nn.Cell):
    """The iSQRT-COV representation: [1x1 conv + BN + ReLU] -> CovPool -> Sqrtm -> TriuVec.

    Parameter names (layer_reduce, layer_reduce_bn) are those of fast-MPN-COV's mpncovresnet, so
    its checkpoints map one to one. ``output_dim`` is the length of the returned vector (or d*d
    when ``is_vec`` is False).
    """

    def __init__(self, in_channels, dimension_reduction=256, iter_num=5, is_sqrt=True, is_vec=True):
        super().__init__()
        self.reduce = bool(dimension_reduction)
        if self.reduce:
            self.layer_reduce = nn.Conv2d(in_channels, dimension_reduction, 1, has_bias=False,
                                          weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
            self.layer_reduce_bn = nn.BatchNorm2d(dimension_reduction, momentum=0.9, eps=1e-5)
            self.layer_reduce_relu = nn.ReLU()
            dim = dimension_reduction
        else:
            dim = in_channels
        self.dim = dim
        self.is_sqrt = is_sqrt
        self.is_vec = is_vec
        self.cov = CovPool()
        self.sqrtm = Sqrtm(iter_num) if is_sqrt else None
        self.triu = TriuVec() if is_vec else None
        self.output_dim = dim * (dim + 1) // 2 if is_vec else dim * dim
        self.iter_num = iter_num

    def construct(self, x):
        if self.reduce:
            x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        dtype = x.dtype
        y = self.cov(_to_float32(x))
        if self.is_sqrt:
            y = self.sqrtm(y)
        if self.is_vec:
            y = self.triu(y)
        else:
            y = y.reshape(y.shape[0], -1)
        return _restore(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the covariance and the Newton-Schulz products for one image."""
        m = height * width
        macs = self.dim * self.dim * m
        if self.is_sqrt:
            macs += num_products(self.iter_num) * self.dim ** 3
        return macs
