"""Config: merge order (defaults < YAML < command line), parsing, every error, saving, the shipped YAMLs."""
import glob
import os
import re

import pytest
import yaml

import src.config as config_module
from src.config import (DEFAULT_CONFIG, REPO_ROOT, SCHEMA, SCHEMA_BY_NAME, Config, ConfigError, load_config,
                        save_config)


def _yaml(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_merge_order_defaults_yaml_command_line(tmp_path):
    path = _yaml(tmp_path, "lr: 0.5\nbatch_size: 8\nhead: gap\n")
    cfg = load_config(["--config_path", path, "--lr=0.01", "--seed", "7"])
    assert cfg.lr == 0.01 and cfg.sources["lr"] == "command line"         # command line wins
    assert cfg.batch_size == 8 and cfg.sources["batch_size"] == f"config file {path}"
    assert cfg.head == "gap"
    assert cfg.seed == 7
    assert cfg.momentum == 0.9 and cfg.sources["momentum"] == "default"  # the documented default, literally
    assert cfg.config_path == path
    assert list(cfg.to_dict()) == [k.name for k in SCHEMA]


def test_default_config_is_the_demo():
    cfg = load_config([])
    assert cfg.config_path == DEFAULT_CONFIG
    assert DEFAULT_CONFIG == os.path.join(REPO_ROOT, "config", "digits_demo_config.yaml")
    assert cfg.demo_dataset == "digits" and cfg.device_target == "CPU" and cfg.num_classes == 10


def test_command_line_value_syntax(tmp_path):
    path = _yaml(tmp_path, "")
    cfg = load_config(["--config_path=" + path, "--hflip=False", "--run_distribute", "true", "--lr_milestones=[3, 5,9]",
                       "--crop_scale=0.5,1", "--lr=1e-3", "--weight_decay=0", "--eval_resize=512,448",
                       "--train_resize", "None", "--device-target=GPU", "--file_name="])
    assert cfg.hflip is False and cfg.run_distribute is True
    assert cfg.lr_milestones == [3, 5, 9]
    assert cfg.crop_scale == [0.5, 1.0]
    assert cfg.lr == 1e-3 and isinstance(cfg.weight_decay, float)
    assert cfg.eval_resize == [512, 448]
    assert cfg.train_resize is None
    assert cfg.device_target == "GPU"
    assert cfg.file_name == ""
    assert load_config(["--config_path=" + path, "--lr_milestones=[]"]).lr_milestones == []
    assert load_config(["--config_path=" + path, "--eval_resize=300"]).eval_resize == 300


def test_yaml_values_ints_for_floats_and_null_for_optional(tmp_path):
    path = _yaml(tmp_path, "lr: 1\nwarmup_epochs: 2\ntrain_transform: resize_random_crop\ntrain_resize: [256, 320]\n"
                           "eval_resize: 256\n")
    cfg = load_config(["--config_path", path])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.warmup_epochs, float)
    assert cfg.train_resize == [256, 320]
    assert load_config(["--config_path", _yaml(tmp_path, "train_resize: null\n", "n.yaml")]).train_resize is None


@pytest.mark.parametrize("text, pattern", [
    ("lr_milestone: [1, 2]\n", r"config file .*c\.yaml: unknown key 'lr_milestone' \(did you mean 'lr_milestones'\?\)"),
    ("lr: fast\n", r"config file .*c\.yaml: key 'lr' expects a number, got 'fast' \(str\)"),
    ("batch_size: 3.5\n", r"key 'batch_size' expects an integer, got 3\.5 \(float\)"),
    ("hflip: 1\n", r"key 'hflip' expects True or False, got 1 \(int\)"),
    ("lr_milestones: 30\n", r"key 'lr_milestones' expects a list of integers, got 30"),
    ("eval_resize: [1, 2, 3]\n", r"key 'eval_resize' expects an integer or a \[height, width\]"),
    ("lr: null\n", r"key 'lr' expects a number, got null"),
    ("device_target: TPU\n", r"key 'device_target' must be one of \['CPU', 'GPU', 'Ascend'\], got 'TPU'"),
    ("batch_size: 0\n", r"config file .*c\.yaml: key 'batch_size' must be >= 1, got 0"),
    ("crop_scale: [0.9, 0.1]\n", r"key 'crop_scale' must be \[min, max\]"),
    ("eval_resize: 100\n", r"key 'eval_resize' must be >= image_size \(224\)"),
    ("lr_milestones: [30, 20]\n", r"key 'lr_milestones' must be increasing"),
    ("train_transform: resize_center_crop\n", r"'resize_center_crop' needs train_resize"),
    ("device_num: 4\n", r"key 'device_num' is 4 but run_distribute is False"),
    ("- lr\n", r"expected 'key: value' lines, got a list"),
    ("lr: [\n", r"config file .*c\.yaml line \d+: invalid YAML"),
])
def test_yaml_errors_name_key_and_file(tmp_path, text, pattern):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(["--config_path", path])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, pattern", [
    (["--lr_milestone=3"], r"command line: unknown flag --lr_milestone \(did you mean 'lr_milestones'\?\)"),
    (["--batchsize=3"], r"did you mean 'batch_size'"),
    (["--lr=abc"], r"command line: --lr expects a number, got 'abc'"),
    (["--hflip=yes"], r"--hflip expects True or False, got 'yes'"),
    (["--lr_milestones=1,x"], r"--lr_milestones expects a list of integers"),
    (["--head=bilinear"], r"command line: key 'head' must be one of \['isqrt_cov', 'gap', 'bcnn', 'cbp', 'dropcov', 'isice'\]"),
    (["--batch_size"], r"--batch_size needs a value"),
    (["train.py"], r"unexpected argument 'train.py'"),
    (["--lr=null"], r"--lr expects a number, got 'null'"),
    (["--config_path=/no/such/file.yaml"], r"config file not found: /no/such/file\.yaml"),
])
def test_command_line_errors(argv, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(argv)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_unreadable_config_file(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"lr: \xff\xfe\x00\x01\n")
    with pytest.raises(ConfigError, match=r"bin\.yaml"):
        load_config(["--config_path", str(p)])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["--config_path", str(tmp_path)])  # a folder is not a config file


def test_yaml_is_read_with_safe_load(tmp_path):
    path = _yaml(tmp_path, "output_path: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(["--config_path", path])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for k in SCHEMA:
        assert f"--{k.name} (" in out and k.help in out


def test_config_object_attribute_access():
    cfg = load_config([])
    with pytest.raises(AttributeError, match="did you mean 'batch_size'"):
        _ = cfg.batch_sise
    with pytest.raises(ConfigError, match="no key 'batch_sise'"):
        cfg.batch_sise = 3
    with pytest.raises(ConfigError, match="expects an integer"):
        cfg.batch_size = "3"
    cfg.batch_size = 3
    assert cfg.batch_size == 3 and cfg["batch_size"] == 3 and "lr" in cfg


def test_no_global_config_at_import():
    assert not any(isinstance(v, Config) for v in vars(config_module).values())


def test_save_config_round_trip(tmp_path):
    cfg = load_config(["--lr=0.0123", "--lr_milestones=2,4", "--eval_resize=[70,80]", "--file_name=x y: z"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(["--config_path", str(out)])
    a, b = cfg.to_dict(), again.to_dict()
    a.pop("config_path"), b.pop("config_path")
    assert a == b
    assert [f for f in os.listdir(out.parent)] == ["config.yaml"]  # no temporary file left


CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "config", "*.yaml")))


def test_every_shipped_config_loads_and_comments_every_key():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"digits_demo_config.yaml", "resnet50_imagenet2012_config.yaml", "resnet101_imagenet2012_config.yaml",
            "resnet50_gap_imagenet2012_config.yaml", "resnet50_cub200_config.yaml", "resnet50_aircraft_config.yaml",
            "resnet50_cars_config.yaml"} <= names
    for path in CONFIGS:
        load_config(["--config_path", path])
        with open(path) as f:
            for line in f:
                if re.match(r"^[a-z_]+:", line):
                    assert re.search(r"\S\s+#\s+\S", line), f"{path}: no comment on: {line.strip()}"
        with open(path) as f:
            keys = set(yaml.safe_load(f))
        assert keys == set(SCHEMA_BY_NAME) - {"config_path"}, f"{path} does not list every key"


def test_paper_and_finetuning_recipes():
    c = load_config(["--config_path", os.path.join(REPO_ROOT, "config", "resnet50_imagenet2012_config.yaml")])
    assert (c.arch, c.head, c.num_classes, c.iter_num, c.dimension_reduction) == ("resnet50", "isqrt_cov", 1000, 5, 256)
    assert (c.optimizer, c.momentum, c.weight_decay, c.lr, c.lr_milestones, c.lr_gamma, c.epoch_size) == \
        ("momentum", 0.9, 1e-4, 0.1, [30, 45, 60], 0.1, 65)
    assert c.batch_size * 4 == c.lr_base_batch == 160 and c.device_target == "GPU"
    assert (c.image_size, c.eval_resize, c.train_transform, c.hflip) == (224, 256, "random_resized_crop", True)
    for name, classes, resize in [("cub200", 200, 448), ("aircraft", 100, [512, 512]), ("cars", 196, [448, 448])]:
        f = load_config(["--config_path", os.path.join(REPO_ROOT, "config", f"resnet50_{name}_config.yaml")])
        assert (f.num_classes, f.batch_size, f.lr_base_batch, f.epoch_size, f.lr, f.classifier_lr_factor,
                f.weight_decay, f.image_size, f.train_resize, f.eval_flip_average) == \
            (classes, 10, 10, 100, 1.2e-3, 5.0, 1e-4, 448, resize, True)
    text = "".join(open(os.path.join(REPO_ROOT, "config", f"resnet50_{n}_config.yaml")).read()
                   for n in ("cub200", "aircraft", "cars"))
    for ref in ("88.0", "90.3", "92.3"):
        assert ref in text


def test_checkpoint_scripts_read_the_config_saved_beside_the_checkpoint(tmp_path):
    trained = load_config(["--config_path", DEFAULT_CONFIG, "--num_classes=7", "--head=gap", "--run_distribute=True",
                           "--device_num=8", "--device_id=3", f"--output_path={tmp_path / 'old_place'}"])
    run = tmp_path / "run"
    save_config(trained, str(run / "ckpt" / "config.yaml"))
    ckpt = str(run / "ckpt" / "best.ckpt")
    cfg, note = config_module.load_checkpoint_config([f"--checkpoint_file_path={ckpt}", "--batch_size=3"])
    saved = str(run / "ckpt" / "config.yaml")
    assert cfg.config_path == saved and cfg.num_classes == 7 and cfg.head == "gap"   # the run's network
    assert cfg.batch_size == 3 and cfg.sources["batch_size"] == "command line"      # the command line wins
    assert (cfg.run_distribute, cfg.device_num, cfg.device_id) == (False, 1, 0)      # one process, device 0
    assert cfg.output_path == str(run)                                               # the run's folder as it is now
    assert note == (f"config: {saved} (saved by the run; command-line keys win; launch settings not inherited: "
                    "run_distribute=True, device_num=8, device_id=3)")
    cfg, _ = config_module.load_checkpoint_config([f"--checkpoint_file_path={ckpt}", "--run_distribute=True",
                                                   "--device_num=2", "--output_path=o"])
    assert (cfg.run_distribute, cfg.device_num, cfg.output_path) == (True, 2, "o")
    # Without the file beside the checkpoint, or with --config_path, that file is not read.
    cfg, note = config_module.load_checkpoint_config([f"--checkpoint_file_path={tmp_path / 'elsewhere.ckpt'}"])
    assert cfg.config_path == DEFAULT_CONFIG and note.endswith("(default: no config.yaml beside "
                                                               f"{tmp_path / 'elsewhere.ckpt'})")
    cfg, note = config_module.load_checkpoint_config([f"--checkpoint_file_path={ckpt}",
                                                      f"--config_path={DEFAULT_CONFIG}"])
    assert cfg.config_path == DEFAULT_CONFIG and cfg.num_classes == 10 and note.endswith("(--config_path)")


def test_skip_mode_is_refused_with_run_distribute():
    """bad_image_mode 'skip' gives ranks different numbers of batches: one would wait forever."""
    with pytest.raises(ConfigError, match="bad_image_mode' is 'skip'.*use 'replace'"):
        load_config(["--run_distribute=True", "--device_num=2", "--bad_image_mode=skip"])
    assert load_config(["--run_distribute=True", "--device_num=2"]).bad_image_mode == "replace"
