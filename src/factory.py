"""Builders shared by train.py, eval.py, export.py and the benchmarks: config -> network, loss,
optimizer and training step. One place, so the scripts hold no if/elif chains of their own."""
import mindspore as ms
from mindspore import nn, ops

from src.adamw import AdamW
from src.checkpoint import head_parameter_names
from src.distributed import split_gradient_fusion
from src.freezing import backbone_lr
from src.models import HEADS, create_model
from src.precision import apply_precision, resolve_amp_level
from src.train_step import TrainStep


def head_kwargs(cfg):
    """Keyword arguments of the configured head: those it declares in HEADS that are config keys,
    unless null (then the head's own default applies, e.g. dimension_reduction 256 for isqrt_cov,
    0 for bcnn and cbp). A new head thus needs its HEADS entry and SCHEMA keys, nothing here."""
    declared = HEADS[cfg.head][1] if cfg.head in HEADS else {}
    return {k: cfg[k] for k in declared if k in cfg and cfg[k] is not None}


def build_network(cfg):
    """The configured network. It takes uint8 images (N, 3, S, S) on the 0-255 scale, as the data
    pipelines deliver them, and normalises them with cfg.mean / cfg.std on the device, in float32."""
    return create_model(cfg.arch, cfg.head, cfg.num_classes, classifier=cfg.classifier, mean=cfg.mean, std=cfg.std,
                        **head_kwargs(cfg))


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


def build_train_step(cfg, net, optimizer):
    """The training step for the configured precision (src/precision.py: apply_precision).

    Float16 levels (O1-O3) keep the representation (meta-layer) and the loss in float32; ``net`` is
    changed in place, so checkpoints and evaluation keep using it. Without float16 the loss scale is
    fixed at 1, still skipping non-finite updates. ``grad_accumulation_steps`` micro-batches make
    one update (src/train_step.py).
    """
    level = resolve_amp_level(cfg)
    split_gradient_fusion(net)  # data parallel: the all-reduce overlaps the backward (src/distributed.py)
    net_with_loss = NetWithLoss(apply_precision(net, level), cfg.label_smoothing)
    k = int(cfg.grad_accumulation_steps)
    if level == "O0":
        step = TrainStep(net_with_loss, optimizer, 1.0, accumulation=k)
    elif cfg.dynamic_loss_scale:
        update = nn.DynamicLossScaleUpdateCell(loss_scale_value=float(cfg.loss_scale), scale_factor=2,
                                               scale_window=int(cfg.loss_scale_window))
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale), update, float16=True, accumulation=k)
    else:
        step = TrainStep(net_with_loss, optimizer, float(cfg.loss_scale), float16=True, accumulation=k)
    step.set_train(True)
    return step
