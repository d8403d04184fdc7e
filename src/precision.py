"""Mixed precision (amp_level O0-O3) with the meta-layer and the loss always in float32.

``apply_precision(net, level)`` is the one place a network gets its precision: train.py's step,
and any evaluation or benchmark that wants the training precision, call it.

What each level casts to float16 (parameters stay float32 master copies; a float16 cell casts its
inputs and weights when it runs):
- O1: MindSpore's white-list cells (convolutions, Dense) compute in float16 and return float32;
  everything else (BatchNorm, ReLU, additions, pooling) stays float32. MindSpore's own O1 rewrites
  the network's source (mindspore.rewrite): the regenerated classes lose the meta-layer's
  hand-written backward (``NameError: triu_scatter_index`` at compile) and leave
  ``rewritten_network/*.py`` in the working folder, so O1 is built here from cells instead.
- O2: MindSpore's O2 (every cell float16, BatchNorm float32 with float16 output), with the
  representation's class added to the black list.
- O3: MindSpore's O3 (every cell float16, BatchNorm included), then the representation back to float32.

At every level the network's ``representation`` (iSQRT-COV: 1x1 reduction conv, BN, ReLU,
CovPool, Sqrtm, TriuVec; GAP: the average) is flagged float32 as a whole, so its inputs are cast
to float32 on entry and every product inside runs in float32; the classifier receives its output.
A network without a ``representation`` Cell, or one whose representation is not float32 after
the casts, is a bug and raises at build time. The input normalisation (``input_norm``, an
InputNormalize: uint8 images to (x - mean) / std) is kept float32 the same way at O2 and O3 (O1
leaves it float32: it is no white-list cell).
"""
import logging

import mindspore as ms
from mindspore import nn, ops

from src.errors import ConfigError
from src.models.preprocess import InputNormalize

AMP_LEVELS = ("O0", "O1", "O2", "O3")
_FLOAT16_ON_CPU_WARNED = []


def resolve_amp_level(cfg):
    """'auto' is O2 on GPU/Ascend and O0 on CPU. Float16 levels on CPU run (to check the GPU
    configuration on a machine without one) but are slower than O0 there: say so once."""
    level = str(cfg.amp_level)
    if level == "auto":
        return "O0" if cfg.device_target == "CPU" else "O2"
    if level not in AMP_LEVELS:
        raise ConfigError(f"amp_level must be auto, O0, O1, O2 or O3, got '{level}'")
    if cfg.device_target == "CPU" and level != "O0" and not _FLOAT16_ON_CPU_WARNED:
        _FLOAT16_ON_CPU_WARNED.append(level)
        logging.getLogger("isqrt_cov").warning(
            f"amp_level={level} on CPU: float16 runs here to check the GPU configuration, not for speed "
            "(CPU float16 kernels are slower than float32); use --amp_level=auto or O0 for CPU training")
    return level


def find_representation(net):
    """The network's ``representation`` Cell (the meta-layer kept in float32); TypeError without one."""
    rep = net.name_cells().get("representation") if isinstance(net, nn.Cell) else None
    if not isinstance(rep, nn.Cell):
        raise TypeError(f"{type(net).__name__} has no 'representation' Cell: mixed precision needs it to keep "
                        "the meta-layer in float32 (networks are features -> representation -> classifier)")
    return rep


class _Float16Out32(nn.Cell):
    """O1: run ``cell`` in float16 and return float32, so the next cell sees full precision.

    ``auto_prefix=False``: the wrapped cell's parameters keep their names (checkpoints unchanged)."""

    def __init__(self, cell):
        super().__init__(auto_prefix=False)
        self.cell = cell.to_float(ms.float16)

    def construct(self, x):
        return ops.cast(self.cell(x), ms.float32)


def _white_list_cells():
    return tuple(c for c in ms.amp.get_white_list() if isinstance(c, type) and issubclass(c, nn.Cell))


def _o1(cell, keep):
    """Wrap every white-list cell under ``cell`` (outside ``keep``) in _Float16Out32, in place."""
    white = _white_list_cells()
    changed = False
    for name, child in list(cell.name_cells().items()):
        if child is keep:
            continue
        if isinstance(child, white):
            cell._cells[name] = _Float16Out32(child)  # pylint: disable=protected-access
            changed = True
        else:
            _o1(child, keep)
    if changed and isinstance(cell, nn.SequentialCell):
        cell.cell_list = list(cell.cells())


def _is_float32(cell):
    flags = cell.get_flags()
    return bool(flags.get("fp32")) and not flags.get("fp16") and not flags.get("bf16")


def check_float32(net, rep):
    """Raise RuntimeError unless ``rep`` is still in ``net`` and every cell of it is flagged float32."""
    if not any(c is rep for _, c in net.cells_and_names()):
        raise RuntimeError(f"mixed precision replaced the representation ({type(rep).__name__}) of "
                           f"{type(net).__name__}: its float32 casts are lost")
    wrong = [name or type(rep).__name__ for name, c in rep.cells_and_names() if not _is_float32(c)]
    if wrong:
        raise RuntimeError(f"representation cells not in float32 after mixed precision: {', '.join(wrong)}")


def apply_precision(net, level):
    """Give ``net`` the precision of ``level`` (O0-O3) and return the Cell to call (float32 output).

    ``net`` is changed in place (flags and wrapper cells; its Parameters, their names and dtypes
    are unchanged, so optimizers, checkpoints and evaluation keep using ``net``). The returned cell
    may wrap ``net``. A second call on the same network raises RuntimeError (the casts would stack).
    """
    if level not in AMP_LEVELS:
        raise ConfigError(f"amp_level must be O0, O1, O2 or O3, got '{level}'")
    if level == "O0":
        return net
    rep = find_representation(net)
    if getattr(net, "amp_level", None):
        raise RuntimeError(f"mixed precision was already applied to this network ({net.amp_level})")
    net.amp_level = level
    if level == "O1":
        _o1(net, rep)
        rep.to_float(ms.float32)
        out = net
    elif level == "O2":
        # A black-listed cell is flagged float32 whole (not recursed into) and its output cast to
        # float16 for the classifier; the BatchNorm black list is MindSpore's own. The list holds
        # classes: another cell of the representation's class would silently stay float32 too.
        inside = {id(c) for _, c in rep.cells_and_names()}
        twins = [n for n, c in net.cells_and_names() if isinstance(c, type(rep)) and id(c) not in inside]
        if twins:
            raise RuntimeError(f"O2 black-lists the representation by its class {type(rep).__name__}, which "
                               f"other cells use too: {', '.join(twins)}")
        out = ms.amp.custom_mixed_precision(net, black_list=ms.amp.get_black_list() + [type(rep), InputNormalize])
    else:
        out = ms.amp.auto_mixed_precision(net, "O3")
        for cell in [rep] + _input_norms(net):
            cell.to_float(ms.float32)
    check_float32(net, rep)
    if level != "O1" and not all(_is_float32(c) for c in _input_norms(net)):
        raise RuntimeError(f"the input normalisation is not in float32 after mixed precision {level}")
    return out


def _input_norms(net):
    return [c for _, c in net.cells_and_names() if isinstance(c, InputNormalize)]
