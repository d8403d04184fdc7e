"""Configuration: schema defaults < YAML file (--config_path) < command line (--key=value).

Why a schema: every key has one declared type, default and help line, so a typo in a YAML file
or a flag, or a value of the wrong type, stops the run at start-up with a one-line message
naming the key and where it came from, instead of failing hours later (or silently using a
default). The command line follows MindSpore's model zoo: ``--key=value`` or ``--key value``,
booleans ``True``/``False``, lists ``--lr_milestones=30,45,60`` or ``[30,45,60]``.

Nothing is built at import time: call ``load_config()`` from the entry point.
"""
import difflib
import os
import sys

import yaml

from src.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from src.run_log import write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "config", "digits_demo_config.yaml")

# torchvision's ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) times 255.
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]




class _Key:
    __slots__ = ("name", "default", "type", "help", "choices", "optional")

    def __init__(self, name, default, type_, help_, choices=None, optional=False):
        self.name, self.default, self.type, self.help = name, default, type_, help_
        self.choices, self.optional = choices, optional


# Types: "str", "int", "float" (ints accepted), "bool", "int_list", "float_list",
# "size" (an int, or a [h, w] list of two ints). optional=True also accepts null / None.
_K = _Key
SCHEMA = [
    _K("config_path", "", "str", "YAML file with the run's settings (relative paths: from the working directory)"),
    _K("data_path", "", "str", "dataset root holding train/ and val/ class folders (ImageNet layout)"),
    _K("output_path", "./output", "str", "folder for checkpoints, logs, metrics and the saved config"),
    _K("checkpoint_file_path", "", "str",
       "checkpoint to evaluate or export (eval.py / export.py); without --config_path, its folder's config.yaml"),
    _K("device_target", "CPU", "str", "hardware to run on", choices=["CPU", "GPU", "Ascend"]),
    _K("device_id", 0, "int", "device index for single-device runs"),
    _K("run_distribute", False, "bool", "data-parallel training over all ranks (mpirun / msrun)"),
    _K("device_num", 1, "int", "number of devices (ranks); checked against the communication group size"),
    _K("mode", "GRAPH", "str", "MindSpore execution mode", choices=["GRAPH", "PYNATIVE"]),
    _K("seed", 1, "int", "random seed for initialisation and data order (epoch e uses seed + e)"),
    _K("arch", "resnet50", "str", "backbone",
       choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16_bn"]),
    _K("head", "isqrt_cov", "str", "representation: iSQRT-COV pooling, global average pooling, B-CNN "
       "or compact bilinear pooling", choices=["isqrt_cov", "gap", "bcnn", "cbp"]),
    _K("num_classes", 1000, "int", "number of classes (must match the class folders)"),
    _K("classifier", "auto", "str", "classifier: auto = fast-MPN-COV's (4096-4096 MLP for vgg16_bn + isqrt_cov, "
       "one linear layer otherwise), linear, or mlp (two hidden layers of 4096, ReLU, dropout 0.5)",
       choices=["auto", "linear", "mlp"]),
    _K("iter_num", 5, "int", "Newton-Schulz iterations of the matrix square root"),
    _K("dimension_reduction", None, "int", "channels after a 1x1 conv + BN + ReLU before pooling; 0 = none, "
       "null = the head's default (isqrt_cov 256, bcnn and cbp 0, as fast-MPN-COV)", optional=True),
    _K("proj_dim", 8192, "int", "cbp: Tensor Sketch dimension (the representation's length)"),
    _K("cbp_method", "gram", "str", "cbp: gram = the Tensor Sketch of X X^T, fft = the same result as the "
       "paper computes it, sketches multiplied through FFTs (slower in MindSpore 2.8)", choices=["gram", "fft"]),
    _K("image_size", 224, "int", "side of the square network input (train crop and eval centre crop)"),
    _K("eval_resize", 256, "size", "eval resize before the centre crop: int = shorter side, [h, w] = exact size"),
    _K("train_transform", "random_resized_crop", "str",
       "train geometry: random_resized_crop (fused decode+crop), resize_random_crop or resize_center_crop "
       "(resize to train_resize, then crop image_size)",
       choices=["random_resized_crop", "resize_random_crop", "resize_center_crop"]),
    _K("train_resize", None, "size", "train resize for resize_*_crop: int = shorter side, [h, w] = exact size",
       optional=True),
    _K("crop_scale", [0.08, 1.0], "float_list", "area range (fractions of the image) of random_resized_crop"),
    _K("hflip", True, "bool", "random horizontal flip in training"),
    _K("eval_flip_average", False, "bool", "at eval, average the logits of the centre crop and its horizontal flip"),
    _K("mean", IMAGENET_MEAN, "float_list", "per-channel RGB mean, 0-255 scale"),
    _K("std", IMAGENET_STD, "float_list", "per-channel RGB std, 0-255 scale"),
    _K("batch_size", 40, "int", "images per device per step"),
    _K("lr_base_batch", 160, "int", "total batch the lr is tuned for: lr is scaled by batch_size*device_num/lr_base_batch"),
    _K("num_parallel_workers", 8, "int", "data pipeline workers (capped at the CPU count)"),
    _K("prefetch_size", 16, "int", "rows each pipeline stage buffers ahead"),
    _K("bad_image_mode", "replace", "str",
       "undecodable images: replace (by another sample; keeps shards equal), skip, or error (stop)",
       choices=["replace", "skip", "error"]),
    _K("demo_dataset", "", "str", "'digits': write scikit-learn's digits to data_path first if it has no train/",
       choices=["", "digits"]),
    _K("epoch_size", 65, "int", "number of training epochs"),
    _K("optimizer", "momentum", "str", "optimizer (SGD with momentum)", choices=["momentum"]),
    _K("momentum", 0.9, "float", "SGD momentum"),
    _K("weight_decay", 1e-4, "float", "L2 weight decay"),
    _K("no_decay_bn_bias", False, "bool", "exclude BatchNorm parameters and biases from weight decay"),
    _K("lr", 0.1, "float", "peak learning rate for a total batch of lr_base_batch"),
    _K("lr_schedule", "step", "str", "learning-rate schedule", choices=["step", "cosine"]),
    _K("lr_milestones", [30, 45, 60], "int_list", "step schedule: epochs at which the lr is multiplied by lr_gamma"),
    _K("lr_gamma", 0.1, "float", "step schedule: lr factor at each milestone"),
    _K("warmup_epochs", 0.0, "float", "linear warm-up length in epochs (per step, fractions allowed)"),
    _K("warmup_lr_init", 0.0, "float", "lr at the first warm-up step (absolute, not scaled)"),
    _K("lr_end", 0.0, "float", "cosine schedule: final lr (absolute, not scaled)"),
    _K("classifier_lr_factor", 1.0, "float", "lr multiplier of the classifier (fast-MPN-COV's classifier_factor)"),
    _K("label_smoothing", 0.0, "float", "label smoothing of the cross-entropy loss"),
    _K("amp_level", "auto", "str", "mixed precision: auto = O2 on GPU/Ascend, O0 on CPU; O1-O3 keep the "
       "meta-layer and the loss in float32", choices=["auto", "O0", "O1", "O2", "O3"]),
    _K("loss_scale", 1024.0, "float", "initial (dynamic) or fixed loss scale for mixed precision"),
    _K("dynamic_loss_scale", True, "bool", "adjust the loss scale and skip steps with overflowing gradients"),
    _K("loss_scale_window", 1000, "int",
       "dynamic loss scale: double the scale after this many steps without overflow"),
    _K("log_interval", 100, "int", "log a training line every N steps"),
    _K("eval_interval", 1, "int", "evaluate on val/ every N epochs"),
    _K("save_every_epochs", 1, "int", "keep a numbered checkpoint every N epochs"),
    _K("keep_checkpoint_max", 5, "int", "numbered checkpoints kept (older ones are deleted)"),
    _K("resume_ckpt", "", "str", "resume a run from this checkpoint (epoch, step, optimizer state)"),
    _K("pre_trained", "", "str",
       "initialise from this checkpoint (finetuning): whole backbone, representation and classifier where they fit"),
    _K("file_format", "MINDIR", "str", "export format", choices=["MINDIR", "ONNX", "AIR"]),
    _K("file_name", "", "str", "export file name without extension (default: <arch>_<head>)"),
    _K("predict_path", "", "str", "predict.py: image file, folder (searched recursively) or quoted glob pattern"),
    _K("top_k", 5, "int", "predict.py: most probable classes reported per image"),
    _K("predict_output", "", "str", "predict.py: also write the predictions to this .csv or .json file"),
    _K("mindir", "", "str", "predict.py: classify with this exported MINDIR file instead of a checkpoint"),
    _K("max_steps_per_epoch", 0, "int", "stop each epoch after N steps (0 = all; for smoke runs)"),
]
SCHEMA_BY_NAME = {k.name: k for k in SCHEMA}

_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "True or False",
               "int_list": "a list of integers", "float_list": "a list of numbers",
               "size": "an integer or a [height, width] list of two integers"}

# Lower bounds of integer / float keys (inclusive), checked after merging.
_MIN = {"device_id": 0, "device_num": 1, "num_classes": 1, "iter_num": 1, "dimension_reduction": 0, "proj_dim": 2,
        "image_size": 1, "batch_size": 1, "lr_base_batch": 1, "num_parallel_workers": 1, "prefetch_size": 1,
        "epoch_size": 1, "momentum": 0.0, "weight_decay": 0.0, "lr": 0.0, "lr_gamma": 0.0,
        "warmup_epochs": 0.0, "warmup_lr_init": 0.0, "lr_end": 0.0, "classifier_lr_factor": 0.0,
        "label_smoothing": 0.0, "loss_scale": 1.0, "loss_scale_window": 1, "log_interval": 1,
        "eval_interval": 1, "save_every_epochs": 1, "keep_checkpoint_max": 1, "max_steps_per_epoch": 0, "seed": 0,
        "top_k": 1}


class Config:
    """Attribute access to the merged settings; ``to_dict()`` gives them in schema order.

    Only schema keys exist: setting an unknown attribute raises ConfigError (catches typos).
    ``sources[key]`` says where each value came from ("default", a YAML path, "command line").
    """

    def __init__(self, values, sources):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "sources", dict(sources))

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"config has no key '{name}'{_suggest(name)}")

    def __setattr__(self, name, value):
        if name not in SCHEMA_BY_NAME:
            raise ConfigError(f"config has no key '{name}'{_suggest(name)}")
        self._values[name] = _coerce(SCHEMA_BY_NAME[name], value, "code")
        self.sources[name] = "code"

    def __getitem__(self, name):
        return self._values[name]

    def __contains__(self, name):
        return name in self._values

    def to_dict(self):
        return {k.name: self._values[k.name] for k in SCHEMA}

    def __repr__(self):
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def _suggest(name):
    close = difflib.get_close_matches(name, list(SCHEMA_BY_NAME), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_error(key, value, where):
    shown = repr(value) if not isinstance(value, str) else f"'{value}'"
    return ConfigError(f"{where}: key '{key.name}' expects {_TYPE_WORDS[key.type]}, "
                       f"got {shown} ({type(value).__name__})")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce(key, value, where):
    """Check a value (from YAML or already parsed from the command line) against the key's type."""
    if value is None:
        if key.optional:
            return None
        raise ConfigError(f"{where}: key '{key.name}' expects {_TYPE_WORDS[key.type]}, got null "
                          f"(only optional keys may be null)")
    t = key.type
    if t == "str":
        if not isinstance(value, str):
            raise _type_error(key, value, where)
    elif t == "int":
        if not _is_int(value):
            raise _type_error(key, value, where)
    elif t == "float":
        if not (_is_int(value) or isinstance(value, float)):
            raise _type_error(key, value, where)
        value = float(value)
    elif t == "bool":
        if not isinstance(value, bool):
            raise _type_error(key, value, where)
    elif t in ("int_list", "float_list"):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, where)
        ok = _is_int if t == "int_list" else (lambda v: _is_int(v) or isinstance(v, float))
        if not all(ok(v) for v in value):
            raise _type_error(key, value, where)
        value = [int(v) if t == "int_list" else float(v) for v in value]
    elif t == "size":
        if _is_int(value):
            pass
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
            value = [int(v) for v in value]
        else:
            raise _type_error(key, value, where)
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{where}: key '{key.name}' must be one of {key.choices}, got '{value}'")
    return value


def _parse_cli_value(key, text):
    """Turn a command-line string into a typed value (then checked by _coerce)."""
    raw = text.strip()
    if key.optional and raw in ("null", "None", "none", "~"):
        return None
    t = key.type
    try:
        if t == "str":
            return text
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "bool":
            if raw.lower() in ("true", "false"):
                return raw.lower() == "true"
            raise ValueError
        if t in ("int_list", "float_list", "size"):
            inner = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
            if t == "size" and "," not in inner:
                return int(inner)
            items = [s.strip() for s in inner.split(",") if s.strip()]
            conv = float if t == "float_list" else int
            return [conv(s) for s in items]
    except ValueError:
        pass
    raise ConfigError(f"command line: --{key.name} expects {_TYPE_WORDS[t]}, got '{text}'")


def _parse_argv(argv):
    """[--key=value | --key value ...] -> {key: string}. Unknown flags raise with a suggestion."""
    out = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"command line: unexpected argument '{tok}' (use --key=value)")
        body = tok[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            i += 1
        else:
            name = body
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{name} needs a value (--{name}=VALUE)")
            value = argv[i + 1]
            i += 2
        name = name.replace("-", "_")
        if name not in SCHEMA_BY_NAME:
            raise ConfigError(f"command line: unknown flag --{name}{_suggest(name)}")
        out[name] = value
    return out


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (pass --config_path=FILE)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected 'key: value' lines, got a {type(data).__name__}")
    return data


def _check_values(values, sources):
    """Range and cross-key checks after merging; messages name the key and where it was set."""
    def fail(name, msg):
        raise ConfigError(f"{sources[name]}: key '{name}' {msg}")

    for name, lo in _MIN.items():
        if values[name] is not None and values[name] < lo:
            fail(name, f"must be >= {lo}, got {values[name]}")
    for name in ("momentum", "label_smoothing"):
        if values[name] >= 1.0:
            fail(name, f"must be < 1, got {values[name]}")
    cs = values["crop_scale"]
    if len(cs) != 2 or not 0.0 < cs[0] <= cs[1] <= 1.0:
        fail("crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got {cs}")
    for name in ("mean", "std"):
        if len(values[name]) != 3:
            fail(name, f"needs 3 values (R, G, B), got {values[name]}")
    if min(values["std"]) <= 0:
        fail("std", f"values must be > 0, got {values['std']}")
    ms_ = values["lr_milestones"]
    if any(m < 0 for m in ms_) or any(b <= a for a, b in zip(ms_, ms_[1:])):
        fail("lr_milestones", f"must be increasing non-negative epochs, got {ms_}")
    size = values["image_size"]
    for name in ("eval_resize", "train_resize"):
        v = values[name]
        if v is None:
            continue
        sides = [v] if _is_int(v) else v
        if min(sides) < size:
            fail(name, f"must be >= image_size ({size}) so the crop fits, got {v}")
    if values["device_num"] > 1 and not values["run_distribute"]:
        fail("device_num", f"is {values['device_num']} but run_distribute is False (a single-process run uses "
                           f"one device: add --run_distribute=True under mpirun/msrun, or set --device_num=1)")
    if values["run_distribute"] and values["bad_image_mode"] == "skip":
        fail("bad_image_mode", "is 'skip', which gives ranks different numbers of batches (one would wait for "
                               "the others forever): use 'replace' (the default) or 'error' with run_distribute")
    if values["train_transform"] != "random_resized_crop" and values["train_resize"] is None:
        fail("train_transform", f"'{values['train_transform']}' needs train_resize (e.g. --train_resize=256)")


def load_config(argv=None, default_config_path=DEFAULT_CONFIG, not_inherited=()):
    """Merge schema defaults < YAML (--config_path, else default_config_path) < command line.

    argv: the command-line arguments without the program name (default sys.argv[1:]).
    not_inherited: keys whose YAML values are ignored (they keep their defaults unless the command
    line sets them). -h/--help prints every key with its help and exits. Raises ConfigError on
    any bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        sys.exit(0)
    cli = _parse_argv(argv)
    path = cli.pop("config_path", None) or default_config_path
    cli = {name: _coerce(SCHEMA_BY_NAME[name], _parse_cli_value(SCHEMA_BY_NAME[name], text), "command line")
           for name, text in cli.items()}
    values = {k.name: k.default for k in SCHEMA}
    sources = {k.name: "default" for k in SCHEMA}
    for name, value in _read_yaml(path).items():
        name = str(name)
        if name not in SCHEMA_BY_NAME:
            raise ConfigError(f"config file {path}: unknown key '{name}'{_suggest(name)}")
        value = _coerce(SCHEMA_BY_NAME[name], value, f"config file {path}")
        if name not in not_inherited:
            values[name], sources[name] = value, f"config file {path}"
    for name, value in cli.items():
        values[name] = value
        sources[name] = "command line"
    values["config_path"] = path
    _check_values(values, sources)
    return Config(values, sources)


def format_help():
    lines = ["usage: python train.py [--config_path=FILE.yaml] [--key=value ...]",
             "Settings: schema defaults < YAML file < command line. Keys:"]
    for k in SCHEMA:
        default = "null" if k.default is None else k.default
        choices = f" {{{', '.join(map(str, k.choices))}}}" if k.choices else ""
        lines.append(f"  --{k.name} ({k.type}{choices}, default {default}): {k.help}")
    return "\n".join(lines)


def save_config(cfg, path):
    """Write the final config as YAML (loadable with --config_path), atomically."""
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    lines = ["# Final configuration of this run (written by src/config.py; usable as --config_path)."]
    for k in SCHEMA:
        if k.name not in d:
            continue
        text = yaml.safe_dump({k.name: d[k.name]}, default_flow_style=True, width=1000).strip()
        text = text[1:-1] if text.startswith("{") and text.endswith("}") else text
        lines.append(f"{text}  # {k.help}")
    write_text(path, "\n".join(lines) + "\n")


# The trainer saves its final configuration beside the checkpoints (<output_path>/ckpt/config.yaml).
SAVED_CONFIG = "config.yaml"
# Keys of a saved configuration that say how that run was launched, not what it trained: eval.py
# and export.py keep their defaults (one process on one device, even for a run trained with mpirun
# on 8 GPUs) unless the command line sets them. output_path becomes the run's folder as it is now
# (the parent of ckpt/): the saved absolute path is stale once a run folder is moved or copied.
LAUNCH_KEYS = ("run_distribute", "device_num", "device_id", "resume_ckpt", "pre_trained", "output_path",
               "checkpoint_file_path")


def model_file(keys):
    """The model a script reads, from its flags (a dict): --mindir (predict.py), else
    --checkpoint_file_path, else <output_path>/ckpt/best.ckpt."""
    return keys.get("mindir") or keys.get("checkpoint_file_path") or os.path.join(
        keys.get("output_path") or SCHEMA_BY_NAME["output_path"].default, "ckpt", "best.ckpt")


def run_file(model, name):
    """<model dir>/name or <model dir>/ckpt/name (a MINDIR sits in the run folder, its ckpt/ beside it)."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(model)))
    return next((p for p in (os.path.join(folder, name), os.path.join(folder, "ckpt", name))
                 if os.path.isfile(p)), None)


def load_checkpoint_config(argv=None):
    """Configuration of a script that reads a model (eval.py, export.py, predict.py), and a line
    saying which configuration it is.

    --config_path wins. Otherwise the configuration the trainer saved beside the model (model_file;
    run_file finds it) is used, without LAUNCH_KEYS, and the command line still overrides any key.
    With no saved configuration: the default (demo) one.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = {} if "-h" in argv or "--help" in argv else _parse_argv(argv)
    if cli.get("config_path"):
        cfg = load_config(argv)
        return cfg, f"config: {cfg.config_path} (--config_path)"
    ckpt = model_file(cli)
    saved = run_file(ckpt, SAVED_CONFIG)
    if saved is None:
        cfg = load_config(argv)
        return cfg, f"config: {cfg.config_path} (default: no {SAVED_CONFIG} beside {ckpt})"
    cfg = load_config(argv, default_config_path=saved, not_inherited=LAUNCH_KEYS)
    if "output_path" not in cli:
        cfg.output_path = os.path.dirname(os.path.dirname(saved))
    launch = _read_yaml(saved)
    dropped = [f"{k}={launch[k]}" for k in LAUNCH_KEYS if k in launch and k not in cli
               and k not in ("output_path", "checkpoint_file_path") and launch[k] != SCHEMA_BY_NAME[k].default]
    note = f"config: {saved} (saved by the run; command-line keys win"
    if dropped:
        note += f"; launch settings not inherited: {', '.join(dropped)}"
    return cfg, note + ")"


PATH_KEYS = ("config_path", "data_path", "output_path", "checkpoint_file_path", "resume_ckpt", "pre_trained",
             "file_name")


def enter_output_dir(cfg):
    """Make every path absolute, then work inside output_path.

    MindSpore drops files in the working folder (./abnormal_image.jpg for a corrupt JPEG, rank_0/
    compile dumps): running from output_path keeps everything a run writes inside the folder the
    user chose.
    """
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if value:
            setattr(cfg, key, os.path.abspath(os.path.expanduser(value)))
    os.makedirs(cfg.output_path, exist_ok=True)
    os.chdir(cfg.output_path)
    return cfg
