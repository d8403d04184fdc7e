"""AdamW as PyTorch's ``torch.optim.AdamW`` computes it (Loshchilov and Hutter, ICLR 2019), for recipes
that use it (iSICE's ``main.py`` finetunes with AdamW, lr 5e-5, weight decay 0.05).

Per parameter p with gradient g, at the t-th applied update (betas 0.9 / 0.999, eps 1e-8, PyTorch's
defaults):  p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
            p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
MindSpore's ``nn.AdamWeightDecay`` has no bias correction (its first steps are ~3x larger at
these betas) and ``nn.Adam``'s weight decay is an L2 term added to g (coupled), hence this Cell.

It takes the project's parameter groups (``src.factory.param_groups``: per-group per-step lr arrays
and weight decays); ``global_step`` indexes the lr arrays (skipped steps advance it, as the lr
schedule counts them), while ``adamw_step`` counts applied updates, as PyTorch's ``step`` does.
``construct(gradients, keep)``: src/train_step.py calls it every step, without a branch, with
``keep`` 0 on a skipped step (gradients then 0): lr 0 and both moment factors 1 leave every weight
and moment as it was.
State in checkpoints: ``adam_m.*``, ``adam_v.*``, ``adamw_step``.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

BETAS = (0.9, 0.999)
EPS = 1e-8

_update = ops.MultitypeFuncGraph("adamw_update")


@_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _update_param(c1, sqrt_c2, b1, b2, lr, wd, param, m, v, grad):
    """One parameter; c1 = 1 - b1^t, sqrt_c2 = sqrt(1 - b2^t); b1, b2 = 1 on a skipped step."""
    grad = ops.cast(grad, ms.float32)
    next_m = m * b1 + grad * (1 - b1)
    next_v = v * b2 + ops.square(grad) * (1 - b2)
    next_p = param * (1.0 - lr * wd) - (lr / c1) * next_m / (ops.sqrt(next_v) / sqrt_c2 + EPS)
    ok = ops.assign(m, next_m)
    ok = ops.depend(ok, ops.assign(v, next_v))
    return ops.depend(ok, ops.assign(param, next_p))


class AdamW(nn.Optimizer):
    """PyTorch's AdamW over ``params`` (Parameters or group dicts with 'params', 'lr', 'weight_decay');
    ``learning_rate`` as nn.Optimizer's (a per-step array for groups without their own)."""

    def __init__(self, params, learning_rate):
        super().__init__(learning_rate, params)
        self.moments = self._parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self._parameters.clone(prefix="adam_v", init="zeros")
        self.adamw_step = Parameter(Tensor(0.0, ms.float32), name="adamw_step", requires_grad=False)
        self.beta1 = Tensor(BETAS[0], ms.float32)
        self.beta2 = Tensor(BETAS[1], ms.float32)
        # Decoupled weight decay per parameter (nn.Optimizer's own decay_weight adds it to g).
        decay = self.get_weight_decay()
        self.decoupled = tuple(float(w) for w in decay) if self.is_group else (float(decay),) * len(self._parameters)
        self.hyper_map = ops.HyperMap()

    def construct(self, gradients, keep):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        t = self.adamw_step + keep
        tc = ops.maximum(t, 1.0)  # a skipped first step: lr 0, and no 0 / 0 in the bias correction
        c1 = 1.0 - ops.pow(self.beta1, tc)
        sqrt_c2 = ops.sqrt(1.0 - ops.pow(self.beta2, tc))
        b1 = self.beta1 * keep + (1.0 - keep)
        b2 = self.beta2 * keep + (1.0 - keep)
        t = ops.depend(t, ops.assign(self.adamw_step, t))
        c1 = ops.depend(c1, t)
        if self.is_group_lr:
            lr = tuple(x * keep for x in lr)
            return self.hyper_map(ops.partial(_update, c1, sqrt_c2, b1, b2), lr, self.decoupled, self._parameters,
                                  self.moments, self.moments2, gradients)
        return self.hyper_map(ops.partial(_update, c1, sqrt_c2, b1, b2, lr * keep), self.decoupled,
                              self._parameters, self.moments, self.moments2, gradients)
