"""The PyTorch peer of the meta-layer: the same iSQRT-COV equations with plain autograd.

This is what a user would otherwise write in PyTorch 2.13 (CPU): covariance pooling, trace
pre-normalisation, the coupled Newton-Schulz iteration with Z0 = I (12 products for
iter_num=5, like src/isqrt_cov.py), post-compensation and the upper triangle, differentiated by
autograd. ``sqrtm_eigh`` is the MPN-COV way (eigen-decomposition), for information.
"""
import numpy as np
import torch

TRACE_EPS = 1e-20


def cov_pool(x):
    """(B, C, H, W) -> (B, C, C): centred covariance of the H*W spatial features, divided by M."""
    b, c, h, w = x.shape
    m = h * w
    xc = x.reshape(b, c, m)
    xc = xc - xc.mean(dim=2, keepdim=True)
    return torch.bmm(xc, xc.transpose(1, 2)) / m


def sqrtm_ns(a, iter_num=5):
    """Trace pre-normalisation, coupled Newton-Schulz (Z0 = I needs no product), compensation."""
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    norm = a.diagonal(dim1=1, dim2=2).sum(dim=1).view(-1, 1, 1) + TRACE_EPS
    an = a / norm
    t = 1.5 * eye - 0.5 * an
    y = torch.bmm(an, t)
    z = t
    for k in range(2, iter_num + 1):
        t = 1.5 * eye - 0.5 * torch.bmm(z, y)
        if k < iter_num:
            y, z = torch.bmm(y, t), torch.bmm(t, z)
        else:
            y = torch.bmm(y, t)
    return y * torch.sqrt(norm)


def sqrtm_eigh(a):
    """Square root by symmetric eigen-decomposition (LAPACK on CPU); eigenvalues clamped at 0."""
    w, v = torch.linalg.eigh(a)
    return torch.bmm(v * torch.sqrt(torch.clamp(w, min=0)).unsqueeze(1), v.transpose(1, 2))


def triu_vec(x):
    """(B, d, d) -> (B, d(d+1)/2), numpy.triu_indices order."""
    b, d, _ = x.shape
    rows, cols = np.triu_indices(d)
    idx = torch.from_numpy((rows * d + cols).astype(np.int64))
    return x.reshape(b, d * d)[:, idx]


def meta_layer(x, iter_num=5, sqrt="ns"):
    """CovPool -> matrix square root ("ns" or "eigh") -> TriuVec."""
    a = cov_pool(x)
    y = sqrtm_ns(a, iter_num) if sqrt == "ns" else sqrtm_eigh(a)
    return triu_vec(y)


class FwdBwd:
    """One step: loss = <meta_layer(x), dout>, its value and its gradient w.r.t. x (autograd).

    Calling it runs the step and returns (loss, grad) as NumPy arrays."""

    def __init__(self, x_np, dout_np, iter_num=5, sqrt="ns"):
        self.x = torch.from_numpy(x_np).requires_grad_(True)
        self.dout = torch.from_numpy(dout_np)
        self.iter_num = iter_num
        self.sqrt = sqrt

    def __call__(self):
        self.x.grad = None
        loss = (meta_layer(self.x, self.iter_num, self.sqrt) * self.dout).sum()
        loss.backward()
        return loss.detach().numpy(), self.x.grad.numpy()
