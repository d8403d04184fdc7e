"""The training step: forward, backward, gradient all-reduce, one finiteness test and the SGD update,
in one graph without a branch, so that a GPU never waits for the host in the middle of a step.

What the step does beyond MindSpore's ``nn.TrainOneStepCell`` + ``nn.Momentum``, and why
(bench/README.md counts the kernels each part costs):

- **One finiteness test.** The loss, every gradient and the BatchNorm running statistics are tested
  by one ``IsFinite`` of the sum of per-tensor sums (a NaN or Inf anywhere makes it non-finite). Only
  a sum of finite values beyond 3.4e38 (gradients around 1e31) would also count as an overflow.
- **One all-reduce of the flags**: [overflow, stop requests of every rank] in one vector, so every
  rank skips the same steps and stops at the same step (a sum: MindSpore's CPU AllReduce has no max).
- **A skipped step without a branch.** The update is always issued: with ``keep`` = 0 the gradients
  are multiplied by 0 through ``MulNoNan`` (0 even for NaN or Inf), the weight decay and the lr by 0
  and the momentum factor is 1, so ``ApplyMomentum`` leaves weights and momentum exactly as they
  were (moment = moment * 1 + 0; weight -= 0 * moment). The unscaling (1 / loss scale) and the mean
  over accumulated micro-batches ride on the same multiplication. MindSpore's TrainOneStepCell
  branches on the flag (``if overflow``): on its GPU backend that reads the flag to the host in the
  middle of every step.
- **BatchNorm statistics.** The forward updates the running statistics in place whatever happens
  to the gradients, and a NaN activation that ReLU hides from the loss still poisons them. One
  concatenation of them feeds the test and a backup, kept after every step whose statistics are
  finite; a step that makes them non-finite says so in its control vector, and the host puts the
  backup back (``restore_statistics``) when it reads it (once, in a rare event, instead of copying
  every statistic every step). Finite statistics of a skipped step are kept, as MindSpore's and
  PyTorch's loss scalers keep them. A step that starts from statistics an earlier step poisoned is
  not blamed for them.
- **Gradient accumulation** (``accumulation`` = k > 1): ``accumulate(images, labels)`` adds one
  micro-batch's scaled gradients and loss to buffers; the step itself adds the last micro-batch,
  all-reduces once, tests and updates once with the mean of the k gradients.

The lr schedule is indexed by steps taken, applied or skipped (``optimizer.global_step``), as the
log and a resume count them. The optimizer (``nn.Momentum`` from src.factory.build_optimizer) holds
the weights' moments, lr arrays and step counter under MindSpore's names (checkpoints keep them);
its update is performed here, with the same arithmetic (moment = momentum * moment + g + wd * w,
w -= lr * moment).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

# Parameters of the step that are not training state: rebuilt at start and at resume, never saved.
CACHE_PREFIX = "step_cache."
STAT_SUFFIXES = ("moving_mean", "moving_variance")

_sum = ops.MultitypeFuncGraph("sum")


@_sum.register("Tensor")
def _sum_tensor(x):
    # Flattened first: MindSpore's CPU ReduceSum over all axes of a 4-D tensor took 3x as long.
    return (x if x.dtype == ms.float32 else ops.cast(x, ms.float32)).reshape(-1).sum()


_sgd = ops.MultitypeFuncGraph("sgd")


@_sgd.register("Function", "Function", "Tensor", "Tensor", "Tensor", "Tensor", "Bool", "Tensor", "Tensor", "Tensor")
def _sgd_update(opt, mul_no_nan, coef, lr, momentum, decay, use_decay, grad, weight, moment):
    g = mul_no_nan(grad, ops.cast(coef, grad.dtype))  # coef 0 (skipped step): 0 even where grad is NaN/Inf
    if use_decay:
        # + weight decay * weight (decay 0 on a skipped step) as nn.Momentum adds it: the pattern
        # MindSpore's GPU backend fuses with ApplyMomentum into one kernel (ApplyMomentumWeightDecayFusion).
        # Addcmul in one kernel took 4.5x as long as Mul + AddN on CPU.
        g = ops.addn((weight * ops.cast(decay, weight.dtype), g))
    return opt(weight, moment, lr, g, momentum)


_scale = ops.MultitypeFuncGraph("scale")


@_scale.register("Function", "Tensor", "Tensor")
def _scale_grad(mul_no_nan, coef, grad):
    return mul_no_nan(grad, ops.cast(coef, grad.dtype))


_add = ops.MultitypeFuncGraph("add")


@_add.register("Tensor", "Tensor")
def _add_tensors(a, b):
    return a + b


_assign_add = ops.MultitypeFuncGraph("assign_add")


@_assign_add.register("Tensor", "Tensor")
def _assign_add_tensor(acc, x):
    return ops.assign_add(acc, x)


_zero = ops.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_tensor(acc):
    return ops.assign(acc, ops.zeros_like(acc))


def _update_groups(optimizer):
    """Runs of consecutive parameters sharing one lr array and one weight decay:
    [(start, end, lr Parameter, weight decay)]. nn.Momentum keeps a group's parameters together."""
    params = optimizer.parameters
    lrs = optimizer.learning_rate
    if not optimizer.dynamic_lr:
        raise TypeError("TrainStep needs the per-step lr arrays src.factory.build_optimizer gives")
    lr_of = [lrs[i].learning_rate for i in range(len(params))] if optimizer.is_group_lr else \
        [lrs.learning_rate] * len(params)
    wd = optimizer.weight_decay
    wd_of = [float(wd[i].asnumpy()) if isinstance(wd, tuple) else float(np.asarray(wd.asnumpy() if hasattr(
        wd, "asnumpy") else wd)) for i in range(len(params))]
    if not optimizer.exec_weight_decay:
        wd_of = [0.0] * len(params)
    groups, start = [], 0
    for i in range(1, len(params) + 1):
        if i == len(params) or lr_of[i] is not lr_of[start] or wd_of[i] != wd_of[start]:
            groups.append((start, i, lr_of[start], wd_of[start]))
            start = i
    return groups


class TrainStep(nn.Cell):
    """``construct(images, labels, stop)`` -> (loss, control): this rank's loss (the mean over the
    update's micro-batches) and the float32 vector [overflow, stop, loss scale, statistics poisoned].

    ``stop`` is this rank's request to stop (a signal number, or 0); ``control[1]`` is the largest
    request over the ranks; ``control[0]`` (the step was skipped) is the same on every rank.
    ``control[3]`` is this rank's: this step made its BatchNorm statistics non-finite; whoever reads
    the control then calls ``restore_statistics()``. ``scale_update`` (a DynamicLossScaleUpdateCell)
    adapts the scale; ``float16`` marks a mixed-precision step, whose overflows are expected now and
    then (skipped and counted by the loop), while in float32 a non-finite step means divergence.
    """

    def __init__(self, net_with_loss, optimizer, loss_scale=1.0, scale_update=None, float16=False, accumulation=1):
        super().__init__(auto_prefix=False)
        self.float16 = bool(float16)
        self.accumulation = int(accumulation)
        self.network = net_with_loss
        self.optimizer = optimizer  # its Parameters: moments, lr arrays, momentum, global_step
        self.weights = optimizer.parameters
        self.global_step = optimizer.global_step
        # nn.Momentum's update is performed here; another optimizer (src/adamw.py) is called with the
        # cleaned gradients and ``keep``, and must leave its state unchanged when keep is 0.
        self.sgd = isinstance(optimizer, nn.Momentum)
        groups = _update_groups(optimizer) if self.sgd else []
        if self.sgd:
            self.moments = optimizer.moments
            self.momentum = optimizer.momentum
        self.bounds = tuple((a, b) for a, b, _, _ in groups)
        self.group_lr = ms.ParameterTuple([lr for _, _, lr, _ in groups])
        self.group_decay = tuple(ms.Tensor(wd, ms.float32) for _, _, _, wd in groups)
        self.group_use_decay = tuple(wd != 0 for _, _, _, wd in groups)
        self.apply = ops.ApplyMomentum()
        self.mul_no_nan = ops.MulNoNan()
        self.stats = ms.ParameterTuple([p for p in net_with_loss.get_parameters()
                                        if p.name.endswith(STAT_SUFFIXES)])
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()
        self.scale_sense = ms.Parameter(ms.Tensor(loss_scale, ms.float32), name="scale_sense", requires_grad=False)
        self.scale_update = scale_update
        # A fixed scale of 1 (float32 training) neither scales the loss nor unscales the gradients.
        self.unscale = scale_update is not None or float(loss_scale) != 1.0
        size = sum(int(np.prod(p.shape)) for p in self.stats)
        self.stats_backup = ms.Parameter(ms.Tensor(np.zeros(max(size, 1), np.float32)),
                                         name=CACHE_PREFIX + "stats_backup", requires_grad=False)
        self.stats_finite = ms.Parameter(ms.Tensor(1.0, ms.float32), name=CACHE_PREFIX + "stats_finite",
                                         requires_grad=False)
        if self.accumulation > 1:
            self.accum = self.weights.clone(prefix=CACHE_PREFIX + "accum", init="zeros")
            self.loss_sum = ms.Parameter(ms.Tensor(0.0, ms.float32), name=CACHE_PREFIX + "loss_sum",
                                         requires_grad=False)
            self.accumulate = _Accumulate(self)  # shares the network and the buffers
        self.reducer = ops.identity
        self.agree = ops.identity
        slot = np.ones(1, np.float32)  # this rank's place in the vector of stop requests
        mode = ms.get_auto_parallel_context("parallel_mode")
        if mode in (ms.ParallelMode.DATA_PARALLEL, ms.ParallelMode.HYBRID_PARALLEL):
            from mindspore.communication import get_group_size, get_rank
            self.reducer = nn.DistributedGradReducer(self.weights, True, get_group_size())
            self.agree = ops.AllReduce()  # a sum: MindSpore's CPU AllReduce has no max
            slot = np.eye(get_group_size(), dtype=np.float32)[get_rank()]
        self.slot = ms.Tensor(slot)
        self.one = ms.Tensor(1.0, ms.float32)
        self.step_one = ms.Tensor([1], ms.int32)
        self.reset_cache()

    def construct(self, images, labels, stop):
        loss = self.network(images, labels)
        scale = self.scale_sense * 1.0  # read before a dynamic scale updates it
        sens = ops.ones_like(loss)
        if self.unscale:
            sens = sens * ops.cast(scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(images, labels, sens)
        coef = ops.reciprocal(scale) if self.unscale else self.one
        if self.accumulation > 1:
            grads = self.hyper_map(_add, grads, self.accum)
            loss = (loss + self.loss_sum) / self.accumulation
            coef = coef / self.accumulation
        grads = self.reducer(grads)
        # One finiteness test: loss, gradients, and the statistics unless an earlier step poisoned them.
        flat = ops.concat([p.reshape(-1) for p in self.stats]) if self.stats else self.stats_backup
        stats_sum = flat.sum()  # 1-D already
        stats_ok = ops.isfinite(stats_sum)
        blamed = ops.select(self.stats_finite > 0, stats_sum, ops.zeros_like(stats_sum))
        total = ops.addn(self.hyper_map(_sum, grads) + (blamed, ops.cast(loss, ms.float32)))
        not_finite = ops.cast(ops.logical_not(ops.isfinite(total)), ms.float32).reshape(1)
        flags = self.agree(ops.concat([not_finite, self.slot * ops.cast(stop, ms.float32)]))
        overflow = flags[0] > 0
        if self.scale_update is not None:
            overflow = self.scale_update(self.scale_sense, overflow)
        keep = ops.cast(ops.logical_not(overflow), ms.float32)
        if self.sgd:
            loss = ops.depend(loss, self._update(grads, coef * keep, keep))
        else:
            clean = self.hyper_map(ops.partial(_scale, self.mul_no_nan, coef * keep), grads)
            loss = ops.depend(loss, self.optimizer(clean, keep))
        poisoned = ops.logical_and(ops.logical_not(stats_ok), self.stats_finite > 0)
        backup = ops.assign(self.stats_backup, ops.select(stats_ok, flat, self.stats_backup))
        loss = ops.depend(loss, backup)
        loss = ops.depend(loss, ops.assign(self.stats_finite, ops.cast(stats_ok, ms.float32)))
        if self.accumulation > 1:
            loss = ops.depend(loss, self.hyper_map(_zero, self.accum))
            loss = ops.depend(loss, ops.assign(self.loss_sum, ops.zeros_like(self.loss_sum)))
        control = ops.stack([ops.cast(overflow, ms.float32), flags[1:].max(), scale,
                             ops.cast(poisoned, ms.float32)])
        return loss, control

    def _update(self, grads, coef, keep):
        """Momentum SGD on every weight, a no-op where ``keep`` is 0 (lr 0, momentum factor 1, g 0)."""
        step = self.global_step
        momentum = self.momentum * keep + (self.one - keep)
        done = ()
        for i in range(len(self.bounds)):
            a, b = self.bounds[i]
            lr = ops.gather(self.group_lr[i], step, 0).reshape(()) * keep
            done = done + self.hyper_map(
                ops.partial(_sgd, self.apply, self.mul_no_nan, coef, lr, momentum, self.group_decay[i] * keep,
                            self.group_use_decay[i]), grads[a:b], self.weights[a:b], self.moments[a:b])
        # The lr schedule counts steps taken, applied or skipped.
        return ops.depend(ops.assign_add(self.global_step, self.step_one), done)

    # ----------------------------------------------------------------- host side
    def reset_cache(self):
        """Back up the current statistics (at build and after a resume loads new ones)."""
        if self.stats:
            flat = np.concatenate([p.asnumpy().reshape(-1).astype(np.float32) for p in self.stats])
            ops.assign(self.stats_backup, ms.Tensor(flat))
        ops.assign(self.stats_finite, ms.Tensor(1.0, ms.float32))

    def restore_statistics(self):
        """Put back the BatchNorm statistics of the last step that left them finite (after a step
        whose control said they were poisoned). Runs after the steps already launched."""
        flat = self.stats_backup.asnumpy()
        at = 0
        for p in self.stats:
            n = int(np.prod(p.shape))
            ops.assign(p, ms.Tensor(flat[at:at + n].reshape(p.shape), p.dtype))
            at += n
        ops.assign(self.stats_finite, ms.Tensor(1.0, ms.float32))

    def training_state(self):
        """What latest.ckpt saves: the Parameters but the caches (rebuilt at resume), as save_checkpoint's list."""
        return [{"name": p.name, "data": p} for p in self.get_parameters() if not p.name.startswith(CACHE_PREFIX)]

    def run(self, batches, stop):
        """One update over ``batches`` (a list of ``accumulation`` (images, labels) micro-batches)."""
        for images, labels in batches[:-1]:
            self.accumulate(images, labels)
        return self(*batches[-1], stop)


class _Accumulate(nn.Cell):
    """One micro-batch: its scaled gradients and loss are added to the step's buffers (no all-reduce,
    no test: the update tests the sum, where a NaN of any micro-batch stays)."""

    def __init__(self, step):
        super().__init__(auto_prefix=False)
        self.network, self.weights, self.grad = step.network, step.weights, step.grad
        self.accum, self.loss_sum, self.scale_sense = step.accum, step.loss_sum, step.scale_sense
        self.unscale = step.unscale
        self.hyper_map = ops.HyperMap()

    def construct(self, images, labels):
        loss = self.network(images, labels)
        sens = ops.ones_like(loss)
        if self.unscale:
            sens = sens * ops.cast(self.scale_sense, loss.dtype)
        grads = self.grad(self.network, self.weights)(images, labels, sens)
        loss = ops.depend(loss, self.hyper_map(_assign_add, self.accum, grads))
        return ops.depend(loss, ops.assign_add(self.loss_sum, ops.cast(loss, ms.float32)))


def micro_batches(iterator, k):
    """Lists of ``k`` consecutive batches of ``iterator`` (an incomplete last list is dropped)."""
    group = []
    for batch in iterator:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
