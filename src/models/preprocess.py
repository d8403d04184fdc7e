"""Input normalisation on the device, inside the compiled network.

The data pipelines hand the network uint8 images (N, 3, H, W) on the 0-255 scale (a quarter of the
bytes of float32 on the way to the device); ``InputNormalize`` makes them float32 (x - mean) / std
per channel, the numbers MindSpore's vision.Normalize computed on the host before. It always computes
in float32: the input is cast first (0-255 integers are exact in float16 too, should a mixed-precision
level cast it on entry), and src/precision.py keeps the cell float32 at every level.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops


class InputNormalize(nn.Cell):
    """(N, 3, H, W) images of any dtype on the 0-255 scale -> float32 (x - mean) / std per channel.

    mean, std: three numbers each on the 0-255 scale (cfg.mean, cfg.std). They are constants of the
    graph, not Parameters, so checkpoints are unchanged and an exported model carries them."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean_values = [float(v) for v in mean]
        self.std_values = [float(v) for v in std]
        if len(self.mean_values) != 3 or len(self.std_values) != 3 or min(self.std_values) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        self.mean = ms.Tensor(np.array(self.mean_values, np.float32).reshape(1, 3, 1, 1))
        self.std = ms.Tensor(np.array(self.std_values, np.float32).reshape(1, 3, 1, 1))

    def construct(self, x):
        return (ops.cast(x, ms.float32) - self.mean) / self.std
