"""Matrix square roots for covariance pooling, each with its forward, hand-written backward and paper.

``SQRT_METHODS`` maps the ``sqrt_method`` key of the isqrt_cov head to a ``SqrtMethod``; a new method
is one module here plus one entry. All Cells compute in float32 (svd_pade in float64 inside) and
return their input's dtype.

| name     | module          | paper                                              | pre-/post-normalisation |
|----------|-----------------|----------------------------------------------------|-------------------------|
| ns       | newton_schulz   | iSQRT-COV, Li et al., CVPR 2018                    | trace / sqrt(trace)     |
| mtp_lya  | lyapunov        | Song, Sebe, Wang, ICLR 2022 (Taylor, K = 10)       | Frobenius / sqrt(norm)  |
| mpa_lya  | lyapunov        | Song, Sebe, Wang, ICLR 2022 (Pade [5/5])           | Frobenius / sqrt(norm)  |
| svd_pade | svd_pade        | Song, Sebe, Wang, ICCV 2021                        | none (exact root)       |

``InvSqrtm`` (newton_schulz) is the Newton-Schulz inverse square root (iSICE's).
"""
from typing import Callable, NamedTuple

import mindspore as ms

from src.errors import DeviceError
from src.matrix_functions import lyapunov
from src.matrix_functions.common import TRACE_EPS
from src.matrix_functions.lyapunov import MPALya, MTPLya
from src.matrix_functions.newton_schulz import InvSqrtm, Sqrtm, num_products
from src.matrix_functions.svd_pade import SvdPade


class SqrtMethod(NamedTuple):
    """A registry entry. ``build(iter_num)`` returns the Cell; ``pools`` True: it takes the (B, C, H, W)
    feature map and forms the covariance itself (svd_pade, in float64), else a (B, d, d) covariance.
    ``products(iter_num)``: (forward, backward) d x d x d matrix products. ``unsupported``: device
    target -> why the method cannot run there (refused when the network is built)."""
    build: Callable
    products: Callable
    paper: str
    pools: bool = False
    unsupported: tuple = ()


SQRT_METHODS = {
    "ns": SqrtMethod(Sqrtm, lambda n: (num_products(n), 2 * num_products(n)),
                     "iSQRT-COV: Li, Xie, Wang, Gao, CVPR 2018"),
    "mtp_lya": SqrtMethod(lambda n: MTPLya(), lambda n: lyapunov.num_products(pade=False),
                          "MTP-Lya: Song, Sebe, Wang, ICLR 2022"),
    "mpa_lya": SqrtMethod(lambda n: MPALya(), lambda n: lyapunov.num_products(pade=True),
                          "MPA-Lya: Song, Sebe, Wang, ICLR 2022",
                          unsupported=(("Ascend", "its Q^-1 P is a Cholesky solve and MindSpore 2.8's Cholesky "
                                                  "has no Ascend kernel (GPU, CPU only)"),)),
    # Products: V diag V^T forward; (G + G^T) V, G V, V^T dV, V (.) V^T backward, all float64.
    "svd_pade": SqrtMethod(lambda n: SvdPade(), lambda n: (1, 5),
                           "SVD-Pade: Song, Sebe, Wang, ICCV 2021", pools=True,
                           unsupported=(("Ascend", "its eigendecomposition (MindSpore 2.8's Eigh, float64) has "
                                                   "no Ascend kernel (GPU, CPU only)"),)),
}


def current_device():
    """The device MindSpore builds for (the context's device_target)."""
    return ms.get_context("device_target")


def get_sqrt_method(name, device_target=None):
    """The registry entry of ``name``; ValueError listing the choices for an unknown one, DeviceError
    (one line) if it cannot run on ``device_target`` (default: the current device)."""
    if name not in SQRT_METHODS:
        raise ValueError(f"unknown sqrt_method {name!r}: choose one of {', '.join(SQRT_METHODS)}")
    method = SQRT_METHODS[name]
    device = device_target or current_device()
    why = dict(method.unsupported).get(device)
    if why:
        raise DeviceError(f"sqrt_method {name} cannot run on {device}: {why}; choose another sqrt_method "
                          f"({', '.join(n for n, m in SQRT_METHODS.items() if device not in dict(m.unsupported))})")
    return method


__all__ = ["SQRT_METHODS", "SqrtMethod", "get_sqrt_method", "current_device", "Sqrtm", "InvSqrtm", "MTPLya",
           "MPALya", "SvdPade", "TRACE_EPS", "num_products"]
