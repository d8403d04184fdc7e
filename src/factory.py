"""Builders shared by train.py, eval.py, export.py and the benchmarks: config -> network, loss,
optimizer and training step. One place, so the scripts hold no if/elif chains of their own."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

from src.adamw import AdamW
from src.checkpoint import head_parameter_names
from src.freezing import backbone_lr
from src.models import HEADS, create_model
from src.precision import apply_precision, resolve_amp_level


def head_kwargs(cfg):
    """Keyword arguments of the configured head: those it declares in HEADS that are config keys,
    unless null (then the head's own default applies, e.g. dimension_reduction 256 for isqrt_cov,
    0 for bcnn and cbp). A new head thus needs its HEADS entry and SCHEMA keys, nothing here."""
    declared = HEADS[cfg.head][1] if cfg.head in HEADS else {}
    return {k: cfg[k] for k in declared if k in cfg and cfg[k] is not None}


def build_network(cfg):
    return create_model(cfg.arch, cfg.head, cfg.num_classes, classifier=cfg.classifier, **head_kwargs(cfg))


class NetWithLoss(nn.Cell):
    """Network + cross-entropy; the loss is computed in float32 whatever the network's precision:
    the logits are cast and the loss Cell is flagged float32 (so no enclosing float16 flag reaches it)."""

    def __init__(self, net, label_smoothing=0.0):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing)).to_float(ms.float32)

    def construct(self, images, labels):
        logits = self.net(images)
        return self.loss(ops.cast(logits, ms.float32), labels)


def param_groups(cfg, net, lr_per_step):
    """Optimizer groups: the classifier at classifier_lr_factor x lr (finetuning), and optionally
    no weight decay on BatchNorm and biases. Every group carries its own per-step lr array."""
    prefix = getattr(net, "classifier_prefix", "fc.")
    # Only a staged run asks for the head: any Cell with trainable_params can be optimised otherwise.
    head = head_parameter_names(net) if cfg.freeze_backbone_epochs > 0 else set()
    groups = {}
    for p in net.trainable_params():
        is_cls = p.name.startswith(prefix)
        no_decay = cfg.no_decay_bn_bias and (p.name.endswith((".gamma", ".beta", ".bias")))
        staged = bool(head) and p.name not in head  # backbone waits (src/freezing.py)
        groups.setdefault((is_cls, no_decay, staged), []).append(p)
    out = []
    for (is_cls, no_decay, staged), params in sorted(groups.items()):
        factor = cfg.classifier_lr_factor if is_cls else 1.0
        lr = backbone_lr(cfg, lr_per_step) if staged else lr_per_step
        decay = cfg.classifier_weight_decay if is_cls and cfg.classifier_weight_decay is not None else cfg.weight_decay
        out.append({"params": params, "weight_decay": 0.0 if no_decay else float(decay),
                    "lr": ms.Tensor(lr * factor, ms.float32)})
    return out


# cfg.optimizer -> builder(groups, lr, cfg)
OPTIMIZERS = {
    "momentum": lambda groups, lr, cfg: nn.Momentum(groups, learning_rate=lr, momentum=float(cfg.momentum)),
    "adamw": lambda groups, lr, cfg: AdamW(groups, learning_rate=lr),
}


def build_optimizer(cfg, net, lr_per_step):
    """The configured optimizer (SGD with momentum, or PyTorch's AdamW: src/adamw.py) over ``param_groups``."""
    groups = param_groups(cfg, net, lr_per_step)
    return OPTIMIZERS[cfg.optimizer](groups, ms.Tensor(lr_per_step, ms.float32), cfg)


_unscale = ops.MultitypeFuncGraph("unscale")


@_unscale.register("Tensor", "Tensor")
def _unscale_grad(scale, grad):
    return grad * ops.cast(ops.reciprocal(scale), grad.dtype)


_finite = ops.MultitypeFuncGraph("finite")


@_finite.register("Tensor")
def _finite_grad(grad):
    # A NaN or Inf anywhere makes the float32 sum non-finite. One read-only reduction is about 5x
    # cheaper on CPU than IsFinite + ReduceAll (57M gradients: ~50 ms against ~280 ms per step).
    # Only a sum beyond 3.4e38 of finite values (gradients ~1e31) would also count as overflow.
    g = grad if grad.dtype == ms.float32 else ops.cast(grad, ms.float32)
    return ops.isfinite(g.reshape(-1).sum())


_copy = ops.MultitypeFuncGraph("copy")


@_copy.register("Tensor")
def _copy_tensor(x):
    return x * 1


_restore_stat = ops.MultitypeFuncGraph("restore_stat")


@_restore_stat.register("Tensor", "Tensor")
def _restore_stat_tensor(param, saved):
    return ops.assign(param, saved)


class TrainStep(nn.Cell):
    """Forward, backward, gradient all-reduce (data parallel) and update, skipped when the loss, a
    gradient or a BatchNorm running statistic is non-finite on any rank.

    ``construct(images, labels, stop)`` returns (loss, control): this rank's loss and the float32
    vector [overflow, stop, loss scale], the same on every rank. ``stop`` is this rank's request to
    stop (a signal number, or 0); ``control[1]`` is the largest request over the ranks. The overflow
    flag is all-reduced too (as MindSpore's TrainOneStepWithLossScaleCell does), so every rank skips
    the same steps and the weights stay identical.

    A skipped step leaves no trace but the step count (the lr schedule is indexed by steps taken,
    ``optimizer.global_step``, as the log and a resume count them): the forward updates BatchNorm's running statistics whatever
    happens to the gradients (a NaN activation that ReLU hides from the loss still poisons them), so
    they are saved before the step and put back when it is skipped.

    MindSpore's TrainOneStepWithLossScaleCell cannot serve here: on CPU it selects an Ascend-only
    overflow kernel. With ``scale_update`` (a DynamicLossScaleUpdateCell) the scale adapts.
    ``float16`` marks a mixed-precision step: its overflows are expected now and then (skipped and
    counted by the loop, fixed scale or dynamic), while in float32 a non-finite step means divergence.
    """

    def __init__(self, net_with_loss, optimizer, loss_scale=1.0, scale_update=None, float16=False):
        super().__init__(auto_prefix=False)
        self.float16 = bool(float16)
        self.network = net_with_loss
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.stats = ms.ParameterTuple([p for p in net_with_loss.get_parameters() if not p.requires_grad])
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()
        self.scale_sense = ms.Parameter(ms.Tensor(loss_scale, ms.float32), name="scale_sense", requires_grad=False)
        self.scale_update = scale_update
        # A fixed scale of 1 (float32 training) neither scales the loss nor unscales every gradient
        # (a pass over all 57M of them); the gradients are then the same whatever scale_sense holds.
        self.unscale = scale_update is not None or float(loss_scale) != 1.0
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
        self.step_one = ms.Tensor([1], ms.int32)

    def construct(self, images, labels, stop):
        saved = self.hyper_map(_copy, self.stats)
        loss = self.network(images, labels)
        scale = self.scale_sense * 1.0
        sens = ops.ones_like(loss)
        if self.unscale:
            sens = sens * ops.cast(scale, loss.dtype)
        grads = self.grad(self.network, self.weights)(images, labels, sens)
        if self.unscale:
            grads = self.hyper_map(ops.partial(_unscale, scale), grads)
        grads = self.reducer(grads)
        finite = ops.stack(self.hyper_map(_finite, grads) + self.hyper_map(_finite, self.stats)).all()
        finite = ops.logical_and(finite, ops.isfinite(loss))
        not_finite = ops.cast(ops.logical_not(finite), ms.float32).reshape(1)
        flags = self.agree(ops.concat([not_finite, self.slot * ops.cast(stop, ms.float32)]))
        overflow = flags[0] > 0
        if self.scale_update is not None:
            overflow = self.scale_update(self.scale_sense, overflow)
        if overflow:
            loss = ops.depend(loss, self.hyper_map(_restore_stat, self.stats, saved))
            # The lr schedule counts steps taken, applied or skipped (the optimizer counts applied ones).
            loss = ops.depend(loss, ops.assign_add(self.optimizer.global_step, self.step_one))
        else:
            loss = ops.depend(loss, self.optimizer(grads))
        control = ops.stack([ops.cast(overflow, ms.float32), flags[1:].max(), scale])
        return loss, control


def build_train_step(cfg, net, optimizer):
    """The training step for the configured precision (src/precision.py: apply_precision).

    Float16 levels (O1-O3) keep the representation (meta-layer) and the loss in float32; ``net`` is
    changed in place, so checkpoints and evaluation keep using it. Without float16 the loss scale is
    fixed at 1, still skipping non-finite updates.
    """
    level = resolve_amp_level(cfg)
    net_with_loss = NetWithLoss(apply_precision(net, level), cfg.label_smoothing)
    if level == "O0":
        step = TrainStep(net_with_loss, optimizer, 1.0)
    elif cfg.dynamic_loss_scale:
        update = nn.DynamicLossScaleUpdateCell(loss_scale_value=float(cfg.loss_scale), scale_factor=2,
                                               scale_window=int(cfg.loss_scale_window))
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale), update, float16=True)
    else:
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale), float16=True)
    step.set_train(True)
    return step
