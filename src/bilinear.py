"""Bilinear representations with fast-MPN-COV's semantics: B-CNN and compact bilinear pooling (CBP).

``BCNN`` (Lin et al., ICCV 2015; fast-MPN-COV ``src/representation/BCNN.py``), per sample with X the
(C, M) feature matrix, M = H*W:  Sigma = X X^T / M (not centred), z = sign(Sigma) sqrt(|Sigma| + 1e-8),
the whole C x C matrix flattened row-major (C^2 values, not the upper triangle), z / max(||z||, 1e-12).

``CBP`` (Gao et al., CVPR 2016, Tensor Sketch; fast-MPN-COV ``src/representation/CBP.py``): two count
sketches of every position's feature, ``CS_t(x)[k] = sum_{c: h_t(c) = k} s_t(c) x_c`` (t = 0, 1, to
``proj_dim`` = D bins), their circular convolution through an FFT, summed over positions (not
averaged), then the same signed square root and L2 normalisation. Hashes h (int32) and signs s
(+-1) are drawn once from a seeded NumPy generator and held as non-trainable Parameters
(``sketch_index``, ``sketch_sign``, shape (2, C)): checkpoints carry them, so a saved network
reproduces its logits whatever seed a later run uses.

Two exact ways to compute CBP, selected by ``method`` (equal up to float rounding):
  "gram" (default): the Tensor Sketch identity: the circular convolution of two count sketches is
          the count sketch of x x^T with hash (h_0(i) + h_1(j)) mod D and sign s_0(i) s_1(j) (Pham
          and Pagh, KDD 2013). Summed over positions it is the count sketch of G = X X^T: M C^2
          multiply-adds, one segment sum of C^2 entries and a (C, C) matrix per image.
  "fft":  as the paper and fast-MPN-COV: count sketches of every position (segment sums), real
          FFTs of length D, the spectra's product summed over positions, one inverse FFT per image.
          O(M D log D) but it holds (M, D/2+1) complex spectra per image, and MindSpore's CPU FFT
          and transposes of (M, D) arrays are slow: bench/heads.py (B=8, forward+backward) measures
          it 18x (14x14) and 39x (28x28) slower than "gram" at VGG-16 width (512 channels), and
          1.6x slower at 2048 channels (ResNet-50 at 448), where "gram" computes 2048^2 M products.
In float32 "fft" leaves round-off of ~1e-7 in bins that no channel pair reaches (exactly 0 in
"gram"), which the signed square root turns into ~3e-4: harmless, but the two differ there.

MindSpore 2.8 FFTs ("fft"): ``ops.rfft`` / ``ops.irfft`` have CPU and Ascend kernels (their docs; the
GPU plugin registers none) and gradients; ``ops.FFTWithSize`` has CPU, GPU (cuFFT) and Ascend kernels
and a gradient, but its CPU kernel is ~15x slower than ops.rfft. So the GPU uses FFTWithSize, other
devices ops.rfft. Products of complex tensors have no gradient in 2.8 ("Mul ... gradient not
support for complex type"): the spectra's product is formed on their real and imaginary parts.

Every Cell computes in float32 and returns its input's dtype.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import HeNormal

SIGNED_SQRT_EPS = 1e-8  # fast-MPN-COV's thresh: added under the square root
L2_EPS = 1e-12  # torch.nn.functional.normalize's eps: the norm is clamped below by it
CBP_METHODS = ("fft", "gram")


def _to_float32(x):
    return x if x.dtype == ms.float32 else ops.cast(x, ms.float32)


def signed_sqrt_l2(z, thresh=SIGNED_SQRT_EPS):
    """sign(z) sqrt(|z| + thresh), then each row divided by max(its L2 norm, 1e-12): (B, n) -> (B, n)."""
    z = ops.sign(z) * ops.sqrt(ops.abs(z) + thresh)
    # max(||z||, eps) as sqrt(max(||z||^2, eps^2)): the same value, but an all-zero z (a dead
    # feature map) gets a zero gradient instead of 0 * inf = NaN from the square root at 0.
    return z / ops.sqrt(ops.maximum((z * z).sum(axis=1, keepdims=True), L2_EPS * L2_EPS))


def sketch_hashes(in_channels, proj_dim, seed=1):
    """(index, sign): int32 and float32 arrays of shape (2, in_channels), index in [0, proj_dim),
    sign in {-1, +1}, from NumPy's RandomState(seed) (the same on every platform)."""
    rng = np.random.RandomState(seed)
    index = rng.randint(0, proj_dim, size=(2, in_channels)).astype(np.int32)
    sign = (2 * rng.randint(0, 2, size=(2, in_channels)) - 1).astype(np.float32)
    return index, sign


def torch_cbp_hashes(in_channels, proj_dim):
    """The hashes fast-MPN-COV's CBP draws (torch.manual_seed(1), then h_0, h_1, s_0, s_1 by
    torch.randint), for converting its checkpoints, which do not store them. Needs PyTorch."""
    import torch  # pylint: disable=import-outside-toplevel
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1)
        index = [torch.randint(0, proj_dim, (in_channels,), dtype=torch.long) for _ in range(2)]
        sign = [2 * torch.randint(0, 2, (in_channels,)) - 1 for _ in range(2)]
    finally:
        torch.random.set_rng_state(state)
    return (np.stack([i.numpy() for i in index]).astype(np.int32),
            np.stack([v.numpy() for v in sign]).astype(np.float32))


class _Reduction(nn.Cell):
    """Optional 1x1 conv + BN + ReLU before pooling, named as iSQRT-COV's (layer_reduce, layer_reduce_bn)
    so converted checkpoints use one naming. fast-MPN-COV's BCNN and CBP have none (the default)."""

    def __init__(self, in_channels, dimension_reduction):
        super().__init__()
        self.enabled = bool(dimension_reduction)
        self.dim = int(dimension_reduction) if self.enabled else in_channels
        if self.enabled:
            self.layer_reduce = nn.Conv2d(in_channels, self.dim, 1, has_bias=False,
                                          weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
            self.layer_reduce_bn = nn.BatchNorm2d(self.dim, momentum=0.9, eps=1e-5)
            self.layer_reduce_relu = nn.ReLU()

    def construct(self, x):
        if self.enabled:
            return self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        return x


class BCNN(nn.Cell):
    """Bilinear pooling: (B, C, H, W) -> (B, C*C) [or (B, d*d) after a 1x1 reduction to d channels].

    ``output_dim`` = C*C (262144 for VGG-16's 512 channels). fast-MPN-COV's ``is_vec`` flag is not
    kept: its Basemodel flattens the output either way.
    """

    def __init__(self, in_channels, dimension_reduction=0, thresh=SIGNED_SQRT_EPS):
        super().__init__(auto_prefix=False)
        self.reduce = _Reduction(in_channels, dimension_reduction)
        self.dim = self.reduce.dim
        self.thresh = thresh
        self.output_dim = self.dim * self.dim
        self.mm_tb = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        if x.ndim != 4:
            raise ValueError(f"BCNN expects a (B, C, H, W) feature map, got shape {x.shape}")
        dtype = x.dtype
        x = _to_float32(self.reduce(x))
        b, c, h, w = x.shape
        xr = x.reshape(b, c, h * w)
        sigma = self.mm_tb(xr, xr) * (1.0 / (h * w))
        y = signed_sqrt_l2(sigma.reshape(b, c * c), self.thresh)
        return y if dtype == ms.float32 else ops.cast(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of X X^T for one image (the full C x C product)."""
        return self.dim * self.dim * height * width


class CBP(nn.Cell):
    """Compact bilinear pooling by Tensor Sketch: (B, C, H, W) -> (B, proj_dim).

    ``output_dim`` = proj_dim (8192, fast-MPN-COV's and the paper's). ``seed`` draws the hashes
    (fast-MPN-COV seeds torch with 1); ``method`` "gram" or "fft" (see the module docstring).
    """

    def __init__(self, in_channels, proj_dim=8192, dimension_reduction=0, method="gram", seed=1,
                 thresh=SIGNED_SQRT_EPS):
        super().__init__(auto_prefix=False)
        if int(proj_dim) != proj_dim or proj_dim < 2:
            raise ValueError(f"CBP proj_dim must be an integer >= 2, got {proj_dim!r}")
        if method not in CBP_METHODS:
            raise ValueError(f"CBP method must be one of {', '.join(CBP_METHODS)}, got {method!r}")
        self.reduce = _Reduction(in_channels, dimension_reduction)
        self.dim = self.reduce.dim
        self.proj_dim = int(proj_dim)
        self.output_dim = self.proj_dim
        self.method = method
        self.thresh = thresh
        index, sign = sketch_hashes(self.dim, self.proj_dim, seed)
        self.sketch_index = Parameter(Tensor(index), name="sketch_index", requires_grad=False)
        self.sketch_sign = Parameter(Tensor(sign), name="sketch_sign", requires_grad=False)
        # Finetuning (--pre_trained) from a checkpoint without them keeps this draw (src/checkpoint.py).
        self.drawn_params = ("sketch_index", "sketch_sign")
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.half = self.proj_dim // 2 + 1
        # ops.rfft has no GPU kernel in 2.8; FFTWithSize has (cuFFT) but its CPU kernel is ~15x slower.
        self.fft_with_size = ms.get_context("device_target") == "GPU"
        self.rfft = ops.FFTWithSize(signal_ndim=1, inverse=False, real=True, onesided=True)
        self.irfft = ops.FFTWithSize(signal_ndim=1, inverse=True, real=True, onesided=True,
                                     signal_sizes=(self.proj_dim,))
        self.real = ops.Real()
        self.imag = ops.Imag()
        self.complex = ops.Complex()

    def _sketch(self, xt, t):
        """Count sketch of hash t of (C, N) columns: (D, N), row k = sum over h_t(c) = k of s_t(c) x_c.
        A segment sum costs C N additions (a dense (C, D) sketch matrix would cost C D N)."""
        index = ops.stop_gradient(self.sketch_index[t])
        sign = ops.stop_gradient(self.sketch_sign[t])
        return ops.unsorted_segment_sum(xt * sign.reshape(-1, 1), index, self.proj_dim)

    def _spectrum(self, s):
        return self.rfft(s) if self.fft_with_size else ops.rfft(s, dim=-1)

    def _fft(self, x):
        b, c, h, w = x.shape
        m = h * w
        xt = x.reshape(b, c, m).transpose(1, 0, 2).reshape(c, b * m)
        f0 = self._spectrum(self._sketch(xt, 0).transpose(1, 0))
        f1 = self._spectrum(self._sketch(xt, 1).transpose(1, 0))
        r0, i0, r1, i1 = self.real(f0), self.imag(f0), self.real(f1), self.imag(f1)
        # The positions' sum commutes with the inverse FFT: one inverse transform per image.
        re = (r0 * r1 - i0 * i1).reshape(b, m, self.half).sum(axis=1)
        im = (r0 * i1 + i0 * r1).reshape(b, m, self.half).sum(axis=1)
        spec = self.complex(re, im)
        return self.irfft(spec) if self.fft_with_size else ops.irfft(spec, n=self.proj_dim, dim=-1)

    def _gram(self, x):
        b, c, h, w = x.shape
        xr = x.reshape(b, c, h * w)
        index = ops.stop_gradient(self.sketch_index)
        sign = ops.stop_gradient(self.sketch_sign)
        # s_0(i) s_1(j) G_ij as one product of sign-flipped copies of X: no (B, C, C) broadcast multiply
        # (2x faster at 2048 channels). ops.index_add would avoid the transposes, but it writes into
        # its first input in place, which gave wrong gradients in a graph holding two of them.
        g = self.mm_tb(xr * sign[0].reshape(1, c, 1), xr * sign[1].reshape(1, c, 1))
        bins = (index[0].reshape(c, 1) + index[1].reshape(1, c)) % self.proj_dim
        # Segment sums reduce the first axis: (C*C, B) -> (D, B).
        weighted = g.reshape(b, c * c).transpose(1, 0)
        return ops.unsorted_segment_sum(weighted, bins.reshape(-1), self.proj_dim).transpose(1, 0)

    def construct(self, x):
        if x.ndim != 4:
            raise ValueError(f"CBP expects a (B, C, H, W) feature map, got shape {x.shape}")
        dtype = x.dtype
        x = _to_float32(self.reduce(x))
        y = self._fft(x) if self.method == "fft" else self._gram(x)
        y = signed_sqrt_l2(y, self.thresh)
        return y if dtype == ms.float32 else ops.cast(y, dtype)

    def matmul_flops(self, height, width):
        """Multiply-adds of the matrix products for one image: X X^T ("gram"); "fft" has none (its
        sketches are segment sums and its FFTs, O(M D log D), are not counted)."""
        return height * width * self.dim * self.dim if self.method == "gram" else 0
