"""PyTorch -> MindSpore checkpoint conversion for the networks of ``src.models``.

Sources: fast-MPN-COV ``mpncovresnet50/101`` checkpoints (iSQRT-COV head) and torchvision ResNet
checkpoints (GAP head), as a bare state_dict or under 'state_dict', with or without the
'module.' prefix of DataParallel. Names map one to one (``torch_to_ms_name``); BN fields
weight/bias/running_mean/running_var become gamma/beta/moving_mean/moving_variance;
num_batches_tracked has no MindSpore counterpart and is dropped.

Head policy: a checkpoint of the same head as the target converts completely. A checkpoint of the
other head (torchvision into "isqrt_cov", or fast-MPN-COV into "gap") converts the backbone only:
its head parameters cannot serve the target's head (fc has another input size, layer_reduce has
no counterpart), so the target's layer_reduce* / fc are left out of the output and keep their
initialisation when loaded; a note says so. ``drop_classifier`` leaves fc out in any case (to
finetune on another number of classes).

Upper-triangle order (fast-MPN-COV issue #20): ``src.isqrt_cov.TriuVec`` uses numpy.triu_indices
order, as does fast-MPN-COV's current Triuvec ("row", the default: any model trained with its
current code). Its earlier Triuvec read the lower triangle row by row ("column": for a symmetric
matrix, the upper triangle column by column). By the maintainer's reply in issue #20, the
published mpncovresnet50-15991845.pth was trained with that earlier order and scores 0.166%
top-1 when evaluated with the newer one (not checked here: those weights are not on this
machine). For such checkpoints pass triu_order="column": the fc columns are permuted into our
order, which gives the same logits (tests/test_convert.py checks this against a PyTorch model
using the earlier order).

torch is imported only when a file is loaded (it is an optional dependency), always with
``weights_only=True`` so that a checkpoint cannot run code.
"""
import re

import numpy as np

from src.errors import ConversionError, first_line, name_list

from src.models.network import ARCHS, create_model

TRIU_ORDERS = ("row", "column")
_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BN_MODULE = re.compile(r"(^|\.)(bn\d*|layer_reduce_bn|downsample\.1)$")
_HEAD_PREFIXES = ("layer_reduce.", "layer_reduce_bn.", "fc.")
_LAYOUTS = {"isqrt_cov": "fast-MPN-COV mpncovresnet", "gap": "torchvision ResNet"}




def torch_to_ms_name(name):
    """MindSpore parameter name of a torchvision / fast-MPN-COV state_dict key, or None for keys
    MindSpore has no parameter for (BN's num_batches_tracked). Strips DataParallel's 'module.'."""
    if name.startswith("module."):
        name = name[len("module."):]
    module, _, field = name.rpartition(".")
    if field == "num_batches_tracked":
        return None
    if _BN_MODULE.search(module) and field in _BN_FIELDS:
        return f"{module}.{_BN_FIELDS[field]}"
    return name


def load_torch_state_dict(path):
    """Tensors of a .pth file as float32 NumPy arrays, keyed by the original names (minus 'module.')."""
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
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"{path}: holds no state_dict (found {keys}); expected a bare state_dict "
                              "or a dict with one under 'state_dict'")
    return {(k[len("module."):] if k.startswith("module.") else k): v.detach().float().numpy()
            for k, v in obj.items() if torch.is_tensor(v)}


def infer_arch(names):
    """The ResNet arch whose block counts and block type match the state_dict keys, or None."""
    counts = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for n in names for m in [re.match(rf"layer{layer}\.(\d+)\.", n)] if m}
        counts.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.search(r"\.conv3\.weight$", n) for n in names)
    for arch, (block, layers) in ARCHS.items():
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


def convert_state_dict(state, arch="resnet50", head="isqrt_cov", num_classes=1000, dimension_reduction=256,
                       triu_order="row", drop_classifier=False, log=print):
    """Map a PyTorch state_dict (name -> array) onto the MindSpore network built by create_model.

    Returns {MindSpore name: float32 array}. Raises ConversionError listing missing, unexpected
    and wrongly shaped keys (with a hint on --arch / --num_classes when the checkpoint tells them).
    """
    if triu_order not in TRIU_ORDERS:
        raise ConversionError(f"triu_order must be one of {', '.join(TRIU_ORDERS)}, got {triu_order!r}")
    head_kwargs = {"dimension_reduction": dimension_reduction} if head == "isqrt_cov" else {}
    try:
        net = create_model(arch, head, num_classes, **head_kwargs)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    expected = _expected_params(net)

    converted = {}
    for name, value in state.items():
        ms_name = torch_to_ms_name(name)
        if ms_name is not None:
            converted[ms_name] = np.ascontiguousarray(value, dtype=np.float32)

    source_head = "isqrt_cov" if any(n.startswith("layer_reduce.") for n in converted) else "gap"
    skip = ()
    if source_head != head:
        skip = _HEAD_PREFIXES
        target_head = sorted({n.split(".")[0] for n in expected if n.startswith(skip)})
        log(f"note: this is a {source_head} checkpoint ({_LAYOUTS[source_head]} layout) and the target head "
            f"is {head}: converting the backbone only; {', '.join(target_head)} keep their initialisation")
    elif drop_classifier:
        skip = ("fc.",)
        log("note: classifier (fc) left out as asked; it keeps its initialisation")
    source_names = list(converted)
    converted = {n: v for n, v in converted.items() if not n.startswith(skip)}
    expected = {n: s for n, s in expected.items() if not n.startswith(skip)}

    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(n for n in set(expected) & set(converted) if tuple(converted[n].shape) != expected[n])
    if missing or unexpected or wrong:
        lines = [f"the checkpoint does not fit {arch} with head {head} and {num_classes} classes:"]
        lines.append(_format_list("missing", missing))
        lines.append(_format_list("unexpected", unexpected))
        lines.append(_format_list("wrongly shaped", [f"{n} {tuple(converted[n].shape)} != expected {expected[n]}"
                                                     for n in wrong]))
        guess = infer_arch(source_names)
        if guess and guess != arch:
            lines.append(f"  hint: the checkpoint's blocks are those of {guess}: pass --arch {guess}")
        if "fc.weight" in wrong and converted["fc.weight"].shape[1] == expected["fc.weight"][1]:
            lines.append(f"  hint: the checkpoint has {converted['fc.weight'].shape[0]} classes: pass "
                         f"--num_classes {converted['fc.weight'].shape[0]}, or --drop_classifier to leave fc out")
        raise ConversionError("\n".join(line for line in lines if line))

    if triu_order == "column" and head == "isqrt_cov" and "fc.weight" in converted:
        if not net.representation.is_vec:
            raise ConversionError("triu_order only applies to a vectorised (is_vec) iSQRT-COV head")
        converted["fc.weight"] = np.ascontiguousarray(
            converted["fc.weight"][:, triu_column_to_row(net.representation.dim)])
    elif head == "isqrt_cov" and source_head == head and "fc.weight" in converted:
        log("note: fc columns kept in the row-major upper-triangle order of fast-MPN-COV's current "
            "Triuvec; for its published mpncovresnet50-15991845.pth (trained with the earlier order, "
            "fast-MPN-COV issue #20) convert with --triu_order column")
    return converted


def save_ms_checkpoint(params, dst):
    """Write {name: array} as a MindSpore checkpoint (loadable with ms.load_checkpoint)."""
    import mindspore as ms
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in params.items()], dst)


def convert_checkpoint(src, dst, arch="resnet50", head="isqrt_cov", num_classes=1000, dimension_reduction=256,
                       triu_order="row", drop_classifier=False, log=print):
    """Read a .pth, convert it for create_model(arch, head, num_classes) and write a .ckpt.

    Returns the list of converted parameter names. Raises ConversionError with a message for the user."""
    state = load_torch_state_dict(src)
    params = convert_state_dict(state, arch, head, num_classes, dimension_reduction, triu_order,
                                drop_classifier, log)
    save_ms_checkpoint(params, dst)
    log(f"wrote {len(params)} parameters to {dst}")
    return sorted(params)
