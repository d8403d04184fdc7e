"""The PyTorch peer of the training-step benchmark: the same network (bench/peers/torch_resnet.py),
cross-entropy, SGD with momentum 0.9 and weight decay 1e-4, float32, channels-first (NCHW), on CPU.

This is what a user would write in PyTorch: ``zero_grad(set_to_none=True)``, forward, loss,
``backward()``, ``step()`` (PyTorch's default foreach SGD). The caller sets the thread count
(``torch.set_num_threads``) to MindSpore's, so the two frameworks get the same cores.
"""
import numpy as np
import torch
from torch import nn

from peers.torch_resnet import create_torch_model


class TorchTrainStep:
    """One training step of ``arch``/``head`` on a fixed random batch; ``__call__`` returns the loss.

    ``forward_only()`` and ``forward_backward()`` run the parts, for the profile."""

    def __init__(self, arch, head, num_classes, batch, image_size, iter_num=5, dimension_reduction=256,
                 lr=0.01, momentum=0.9, weight_decay=1e-4, seed=0):
        torch.manual_seed(seed)
        kwargs = {"iter_num": iter_num, "dimension_reduction": dimension_reduction} if head == "isqrt_cov" else {}
        self.model = create_torch_model(arch, head, num_classes, **kwargs).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()
        rng = np.random.default_rng(seed)
        self.images = torch.from_numpy(rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32))
        self.labels = torch.from_numpy(rng.integers(0, num_classes, batch).astype(np.int64))

    def num_params(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def forward_only(self):
        with torch.no_grad():
            return float(self.loss_fn(self.model(self.images), self.labels))

    def forward_backward(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.images), self.labels)
        loss.backward()
        return float(loss.detach())

    def __call__(self):
        loss = self.forward_backward()
        self.opt.step()
        return loss
