"""PyTorch -> MindSpore checkpoint conversion for the networks of ``src.models``.

Sources (layouts in ``src.models.torch_layouts``, detected from the keys and named in the output):
torchvision ResNets and vgg16_bn; fast-MPN-COV's ``mpncovresnet50/101`` and ``mpncovvgg16_bn``;
and what fast-MPN-COV's ``main.py`` saves, ``{'epoch', 'arch', 'state_dict', 'best_prec1',
'optimizer'}`` with its Basemodel regrouping (features / representation / classifier), trained
from scratch or finetuned, for MPNCOV, GAvP, BCNN and CBP representations; DropCov's ``resnet*_ACD``
and iSICE's main.py models (SICE representation), whose keys follow the same layouts. A bare state_dict or
one under 'state_dict', with or without DataParallel's 'module.'. BN fields weight/bias/
running_mean/running_var become gamma/beta/moving_mean/moving_variance.

Head policy: a checkpoint whose head fits the target's (the same reduction conv, a classifier
taking the target representation's output size) converts completely. Otherwise (torchvision
weights into "isqrt_cov", fast-MPN-COV weights into "gap", ...) the backbone only: the target's
representation and classifier are left out of the output and keep their initialisation when
loaded; a note says so. ``drop_classifier`` leaves the classifier out in any case (to finetune on
another number of classes). The classifier kind (one linear layer or the 4096-4096 MLP) follows
the checkpoint unless ``classifier`` says otherwise.

Upper-triangle order (fast-MPN-COV issue #20): ``src.isqrt_cov.TriuVec`` uses numpy.triu_indices
order, as does fast-MPN-COV's current Triuvec ("row", the default: any model trained with its
current code). Its earlier Triuvec read the lower triangle row by row ("column": for a symmetric
matrix, the upper triangle column by column). By the maintainer's reply in issue #20, the
published mpncovresnet50-15991845.pth was trained with that earlier order and scores 0.166%
top-1 when evaluated with the newer one (not checked here: those weights are not on this
machine). For such checkpoints pass triu_order="column": the columns of the classifier's first
layer are permuted into our order, which gives the same logits (tests/test_convert.py checks this
against a PyTorch model using the earlier order).

torch is imported only when a file is loaded (it is an optional dependency), always with
``weights_only=True`` so that a checkpoint cannot run code.
"""
import re

import numpy as np

from src.errors import ConversionError, first_line, name_list
from src.models.network import HEADS, create_model
from src.models.resnet import RESNETS
from src.models.torch_layouts import rename_state, strip_data_parallel

TRIU_ORDERS = ("row", "column")
_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BN_MODULE = re.compile(r"(^|\.)(bn\d*|layer_reduce_bn|downsample\.1)$")
_HEAD_PREFIXES = ("layer_reduce.", "layer_reduce_bn.", "fc.", "classifier.")
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
# checkpoint 'arch' of fast-MPN-COV's main.py -> this project's arch
_SOURCE_ARCHS = {"mpncovresnet50": "resnet50", "mpncovresnet101": "resnet101", "mpncovvgg16_bn": "vgg16_bn"}


def torch_to_ms_name(name):
    """MindSpore parameter name of a torchvision / fast-MPN-COV ResNet state_dict key, or None for
    keys MindSpore has no parameter for (BN's num_batches_tracked). Strips DataParallel's 'module.'.
    (Whole state_dicts of any layout go through ``torch_layouts.rename_state``, which finds BN
    modules by their running_mean entry.)"""
    name = strip_data_parallel(name)
    module, _, field = name.rpartition(".")
    if field == "num_batches_tracked":
        return None
    if _BN_MODULE.search(module) and field in _BN_FIELDS:
        return f"{module}.{_BN_FIELDS[field]}"
    return name


def load_torch_checkpoint(path):
    """(state, meta): the tensors of a .pth as float32 NumPy arrays keyed by their original names,
    and the checkpoint's 'arch' / 'epoch' / 'best_prec1' entries when it has them (main.py's)."""
    try:
        import torch
    except ImportError as exc:
        raise ConversionError("reading a PyTorch checkpoint needs torch: pip install torch") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError with long texts
        first = first_line(exc)
        raise ConversionError(
            f"{path}: could not be read as a PyTorch checkpoint with weights_only=True ({first}). "
            "If it pickles a whole model or other objects, re-save it from trusted code as "
            "torch.save(model.state_dict(), 'weights.pth')") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: obj[k] for k in ("arch", "epoch", "best_prec1") if isinstance(obj.get(k), (str, int, float))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"{path}: holds no state_dict (found {keys}); expected a bare state_dict "
                              "or a dict with one under 'state_dict'")
    return {k: v.detach().float().numpy() for k, v in obj.items() if torch.is_tensor(v)}, meta


def load_torch_state_dict(path):
    """Tensors of a .pth file as float32 NumPy arrays, keyed by their original names."""
    return load_torch_checkpoint(path)[0]


def infer_arch(names):
    """The ResNet arch whose block counts and block type match the state_dict keys, or None."""
    counts = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for n in names for m in [re.match(rf"layer{layer}\.(\d+)\.", n)] if m}
        counts.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.search(r"\.conv3\.weight$", n) for n in names)
    for arch, (block, layers) in RESNETS.items():
        if tuple(counts) == tuple(layers) and (block.expansion == 4) == bottleneck:
            return arch
    return None


def triu_column_to_row(d):
    """Column permutation taking fc weights trained on the "column" triu order to the "row" order:
    w_row = w_column[:, perm]. The pair (r, c), r <= c, is at c(c+1)/2 + r in the "column" order."""
    rows, cols = np.triu_indices(d)
    return cols * (cols + 1) // 2 + rows


def _expected_params(net):
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def _format_list(title, items, limit=40):
    if not items:
        return ""
    return f"  {title} ({len(items)}): " + name_list(items, limit, sort=False)


def _source_classifier(converted):
    """("mlp" | "linear" | None, name of its first layer's weight) of the renamed checkpoint."""
    if "classifier.0.weight" in converted:
        return "mlp", "classifier.0.weight"
    if "fc.weight" in converted:
        return "linear", "fc.weight"
    return None, None


def _head_mismatch(converted, net, src_first):
    """Why the checkpoint's head cannot serve the target's, or None if it can."""
    src_reduce = any(n.startswith("layer_reduce.") for n in converted)
    tgt_reduce = any(p.name.startswith("layer_reduce.") for p in net.get_parameters())
    if src_reduce != tgt_reduce:
        return ("the checkpoint has a 1x1 reduction conv (layer_reduce) and the target head none" if src_reduce
                else f"the target's {net.head} head has a 1x1 reduction conv (layer_reduce) and the checkpoint none")
    if src_first is not None and converted[src_first].shape[1] != net.representation.output_dim:
        return (f"its classifier takes {converted[src_first].shape[1]} features, the target's {net.head} head "
                f"gives {net.representation.output_dim}")
    return None


def _fill_unsaved(net, converted, log):
    """Fixed (non-trainable, non-BN) representation parameters the checkpoint lacks: fast-MPN-COV
    keeps e.g. CBP's sketch hashes as plain attributes drawn from a seed, outside its state_dict.
    A representation reproducing those draws says so with ``fast_mpn_cov_params()`` ({name: array});
    otherwise the values the network was built with are used, and a note says the logits match
    fast-MPN-COV's only if they equal its draws."""
    fixed = [p for p in net.representation.get_parameters() if not p.requires_grad
             and not p.name.endswith(("moving_mean", "moving_variance")) and p.name not in converted]
    if not fixed:
        return
    names = ", ".join(p.name for p in fixed)
    draw = getattr(net.representation, "fast_mpn_cov_params", None)
    if draw is not None:
        converted.update({n: np.asarray(v) for n, v in draw().items()})
        log(f"note: {names} (not saved by fast-MPN-COV) drawn as fast-MPN-COV draws them")
    else:
        converted.update({p.name: p.asnumpy() for p in fixed})
        log(f"note: {names} not in the checkpoint (fast-MPN-COV does not save them): taken from the network as "
            "built; the logits equal the PyTorch model's only if these equal its values")


def _hints(arch, layout, source_names, source_arch, converted, expected, wrong, net):
    lines = []
    if layout == "vgg" and "features.1.gamma" not in source_names:
        return ["  hint: the checkpoint's VGG has no batch normalisation; this project has vgg16_bn only"]
    if any(n.startswith("eca_layer.") for n in source_names) and net.head != "dropcov":
        lines.append("  hint: the checkpoint is DropCov's resnet*_ACD (eca_layer): pass --head dropcov")
    guess = infer_arch(source_names) if layout != "vgg" else "vgg16_bn"
    if source_arch:
        guess = _SOURCE_ARCHS.get(source_arch, source_arch) if guess is None else guess
    if guess and guess != arch:
        lines.append(f"  hint: the checkpoint holds {guess} ({source_arch or 'from its keys'}): pass --arch {guess}")
    out = net.classifier.output_weight
    if out in wrong and converted[out].shape[1] == expected[out][1]:
        lines.append(f"  hint: the checkpoint has {converted[out].shape[0]} classes: pass --num_classes "
                     f"{converted[out].shape[0]}, or --drop_classifier to leave the classifier out")
    return lines


def convert_state_dict(state, arch="resnet50", head="isqrt_cov", num_classes=1000, dimension_reduction=None,
                       triu_order="row", drop_classifier=False, log=print, classifier=None, source_arch=None):
    """Map a PyTorch state_dict (name -> array) onto the MindSpore network built by create_model.

    ``classifier``: None = the kind the checkpoint holds (one linear layer or the MLP), else
    "auto" / "linear" / "mlp" as create_model. ``source_arch``: the checkpoint's 'arch' entry
    (main.py's), for notes and hints. Returns {MindSpore name: float32 array}. Raises
    ConversionError listing missing, unexpected and wrongly shaped keys (with a hint on --arch /
    --num_classes when the checkpoint tells them).
    """
    if triu_order not in TRIU_ORDERS:
        raise ConversionError(f"triu_order must be one of {', '.join(TRIU_ORDERS)}, got {triu_order!r}")
    try:
        layout, description, converted = rename_state(state, head)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    converted = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in converted.items()}
    log(f"layout: {description}" + (f" (arch '{source_arch}')" if source_arch else ""))
    src_kind, src_first = _source_classifier(converted)
    declared = HEADS[head][1] if head in HEADS else {}
    head_kwargs = ({"dimension_reduction": dimension_reduction}
                   if dimension_reduction is not None and "dimension_reduction" in declared else {})
    try:
        net = create_model(arch, head, num_classes, classifier=classifier or src_kind or "auto", **head_kwargs)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    expected = _expected_params(net)
    rep_names = {p.name for p in net.representation.get_parameters()}

    skip = ()
    reason = _head_mismatch(converted, net, src_first)
    if reason:
        skip = _HEAD_PREFIXES + tuple(rep_names)
        target_head = sorted({n.split(".")[0] for n in expected if n.startswith(skip)})
        log(f"note: {reason}: converting the backbone only; {', '.join(target_head)} keep their initialisation")
    elif src_kind is None or src_kind != net.classifier_kind or drop_classifier:
        skip = _CLASSIFIER_PREFIXES
        why = ("the checkpoint holds no classifier" if src_kind is None else "as asked" if drop_classifier else
               f"the checkpoint's classifier is {src_kind}, the target's {net.classifier_kind}")
        log(f"note: classifier left out ({why}); it keeps its initialisation")
    if not reason:
        _fill_unsaved(net, converted, log)
    source_names = list(converted)
    converted = {n: v for n, v in converted.items() if not n.startswith(skip)}
    expected = {n: s for n, s in expected.items() if not n.startswith(skip)}

    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(n for n in set(expected) & set(converted) if tuple(converted[n].shape) != expected[n])
    if missing or unexpected or wrong:
        lines = [f"the checkpoint ({description}) does not fit {arch} with head {head}, "
                 f"{net.classifier_kind} classifier and {num_classes} classes:"]
        lines.append(_format_list("missing", missing))
        lines.append(_format_list("unexpected", unexpected))
        lines.append(_format_list("wrongly shaped", [f"{n} {tuple(converted[n].shape)} != expected {expected[n]}"
                                                     for n in wrong]))
        lines += _hints(arch, layout, source_names, source_arch, converted, expected, wrong, net)
        raise ConversionError("\n".join(line for line in lines if line))

    if source_arch and source_arch.startswith("resnet") and head == "isqrt_cov":
        log(f"note: fast-MPN-COV's {source_arch} keeps layer4 at stride 2 under any representation; this "
            "project's isqrt_cov ResNet runs it at stride 1 (as mpncovresnet): the weights load, the logits differ")
    first = net.classifier.input_weight
    if triu_order == "column" and head == "isqrt_cov" and first in converted:
        if not net.representation.is_vec:
            raise ConversionError("triu_order only applies to a vectorised (is_vec) iSQRT-COV head")
        converted[first] = np.ascontiguousarray(converted[first][:, triu_column_to_row(net.representation.dim)])
    elif head == "isqrt_cov" and first in converted:
        log(f"note: {first} columns kept in the row-major upper-triangle order of fast-MPN-COV's current "
            "Triuvec; for its published mpncovresnet50-15991845.pth (trained with the earlier order, "
            "fast-MPN-COV issue #20) convert with --triu_order column")
    return converted


def save_ms_checkpoint(params, dst):
    """Write {name: array} as a MindSpore checkpoint (loadable with ms.load_checkpoint)."""
    import mindspore as ms
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in params.items()], dst)


def convert_checkpoint(src, dst, arch="resnet50", head="isqrt_cov", num_classes=1000, dimension_reduction=None,
                       triu_order="row", drop_classifier=False, log=print, classifier=None):
    """Read a .pth, convert it for create_model(arch, head, num_classes, classifier) and write a .ckpt.

    Returns the list of converted parameter names. Raises ConversionError with a message for the user."""
    state, meta = load_torch_checkpoint(src)
    params = convert_state_dict(state, arch, head, num_classes, dimension_reduction, triu_order,
                                drop_classifier, log, classifier=classifier, source_arch=meta.get("arch"))
    save_ms_checkpoint(params, dst)
    log(f"wrote {len(params)} parameters to {dst}")
    return sorted(params)
