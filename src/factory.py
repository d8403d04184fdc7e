"""Builders shared by train.py, eval.py, export.py and the benchmarks: config -> network, loss,
optimizer and training step. One place, so the scripts hold no if/elif chains of their own."""
import mindspore as ms
from mindspore import nn, ops

from src.errors import ConfigError
from src.models import HEADS, create_model

AMP_LEVELS = ("O0", "O1", "O2", "O3")


def head_kwargs(cfg):
    """Keyword arguments of the configured head: those it declares in HEADS that are config keys,
    unless null (then the head's own default applies, e.g. dimension_reduction 256 for isqrt_cov,
    0 for bcnn and cbp). A new head thus needs its HEADS entry and SCHEMA keys, nothing here."""
    declared = HEADS[cfg.head][1] if cfg.head in HEADS else {}
    return {k: cfg[k] for k in declared if k in cfg and cfg[k] is not None}


def build_network(cfg):
    return create_model(cfg.arch, cfg.head, cfg.num_classes, **head_kwargs(cfg))


def resolve_amp_level(cfg):
    """'auto' is O2 on GPU/Ascend and O0 on CPU; float16 levels on CPU are refused with the fix."""
    level = str(cfg.amp_level)
    if level == "auto":
        return "O0" if cfg.device_target == "CPU" else "O2"
    if level not in AMP_LEVELS:
        raise ConfigError(f"amp_level must be auto, O0, O1, O2 or O3, got '{level}'")
    if cfg.device_target == "CPU" and level != "O0":
        raise ConfigError(f"amp_level={level} (float16) is for GPU and Ascend; on CPU use --amp_level=O0 "
                         "or --amp_level=auto")
    return level


class NetWithLoss(nn.Cell):
    """Network + cross-entropy; the loss is computed in float32 whatever the network's precision."""

    def __init__(self, net, label_smoothing=0.0):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))

    def construct(self, images, labels):
        logits = self.net(images)
        return self.loss(ops.cast(logits, ms.float32), labels)


def param_groups(cfg, net, lr_per_step):
    """Momentum groups: the classifier at classifier_lr_factor x lr (finetuning), and optionally
    no weight decay on BatchNorm and biases. Every group carries its own per-step lr array."""
    prefix = getattr(net, "classifier_prefix", "fc.")
    groups = {}
    for p in net.trainable_params():
        is_cls = p.name.startswith(prefix)
        no_decay = cfg.no_decay_bn_bias and (p.name.endswith((".gamma", ".beta", ".bias")))
        groups.setdefault((is_cls, no_decay), []).append(p)
    out = []
    for (is_cls, no_decay), params in sorted(groups.items()):
        factor = cfg.classifier_lr_factor if is_cls else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else float(cfg.weight_decay),
                    "lr": ms.Tensor(lr_per_step * factor, ms.float32)})
    return out


def build_optimizer(cfg, net, lr_per_step):
    if cfg.optimizer != "momentum":
        raise ConfigError(f"optimizer must be 'momentum', got '{cfg.optimizer}'")
    groups = param_groups(cfg, net, lr_per_step)
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr_per_step, ms.float32), momentum=float(cfg.momentum))


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


class TrainStep(nn.Cell):
    """Forward, backward, gradient all-reduce (data parallel) and update, skipped when the loss, a
    gradient or a BatchNorm running statistic is non-finite. Returns (loss, overflow, loss scale).

    The running statistics are checked because the forward updates them whatever happens to the
    gradients: a NaN activation that ReLU hides from the loss still poisons them.

    MindSpore's TrainOneStepWithLossScaleCell cannot serve here: on CPU it selects an Ascend-only
    overflow kernel. With ``scale_update`` (a DynamicLossScaleUpdateCell) the scale adapts.
    """

    def __init__(self, net_with_loss, optimizer, loss_scale=1.0, scale_update=None):
        super().__init__(auto_prefix=False)
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
        mode = ms.get_auto_parallel_context("parallel_mode")
        if mode in (ms.ParallelMode.DATA_PARALLEL, ms.ParallelMode.HYBRID_PARALLEL):
            from mindspore.communication import get_group_size
            self.reducer = nn.DistributedGradReducer(self.weights, True, get_group_size())

    def construct(self, images, labels):
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
        overflow = ops.logical_not(finite)
        if self.scale_update is not None:
            overflow = self.scale_update(self.scale_sense, overflow)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, overflow, scale


def build_train_step(cfg, net, optimizer):
    """The training step for the configured precision.

    Mixed precision casts the backbone (O1-O3); the meta-layer stays float32 (it casts inside) and so
    does the loss. Without float16 the loss scale is fixed at 1, still skipping non-finite updates.
    """
    level = resolve_amp_level(cfg)
    if level != "O0":
        net = ms.amp.auto_mixed_precision(net, level)
        rep = getattr(net, "representation", None)
        if rep is not None:
            rep.to_float(ms.float32)
    net_with_loss = NetWithLoss(net, cfg.label_smoothing)
    if level == "O0":
        step = TrainStep(net_with_loss, optimizer, 1.0)
    elif cfg.dynamic_loss_scale:
        update = nn.DynamicLossScaleUpdateCell(loss_scale_value=float(cfg.loss_scale), scale_factor=2,
                                               scale_window=1000)
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale), update)
    else:
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale))
    step.set_train(True)
    return step
