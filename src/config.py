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

from src.config_schema import SCHEMA, SCHEMA_BY_NAME, _MIN, _TYPE_WORDS
from src.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from src.run_log import write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "config", "digits_demo_config.yaml")


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
    if values["optimizer"] == "adamw" and values["freeze_backbone_epochs"] > 0:
        fail("freeze_backbone_epochs", "needs optimizer momentum: the second stage would need a fresh AdamW state "
                                       "(moments and bias correction) for the backbone; finetune in two runs instead "
                                       "(the second with --pre_trained)")
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
