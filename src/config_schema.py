"""The configuration schema: every key with its type, default, help line, choices and lower bound.

One declaration per key, so src/config.py can check a YAML file or a flag against it and say which
key is wrong, where it was set and what was expected; shipped configs list every key of it.
"""

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
    _K("data_path", "", "str", "dataset root holding the train_split and val_split folders of class folders "
       "(ImageNet layout)"),
    _K("train_split", "train", "str", "training folder of class folders, under data_path"),
    _K("val_split", "val", "str", "validation folder of class folders, under data_path (eval.py evaluates it)"),
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
    _K("head", "isqrt_cov", "str", "representation: iSQRT-COV pooling, global average pooling, B-CNN, "
       "compact bilinear pooling, DropCov or iSICE", choices=["isqrt_cov", "gap", "bcnn", "cbp", "dropcov", "isice"]),
    _K("num_classes", 1000, "int", "number of classes (must match the class folders)"),
    _K("classifier", "auto", "str", "classifier: auto = fast-MPN-COV's (4096-4096 MLP for vgg16_bn + isqrt_cov, "
       "one linear layer otherwise), linear, or mlp (two hidden layers of 4096, ReLU, dropout 0.5)",
       choices=["auto", "linear", "mlp"]),
    _K("iter_num", 5, "int", "Newton-Schulz iterations of the matrix square root (sqrt_method ns)"),
    _K("sqrt_method", "ns", "str", "isqrt_cov: matrix square root: ns = Newton-Schulz (iSQRT-COV), mtp_lya / "
       "mpa_lya = Taylor / Pade with Lyapunov backward (ICLR 2022), svd_pade = float64 eigendecomposition with "
       "Pade backward (ICCV 2021; GPU/CPU)", choices=["ns", "mtp_lya", "mpa_lya", "svd_pade"]),
    _K("dimension_reduction", None, "int", "channels after a 1x1 conv + BN + ReLU before pooling; 0 = none, "
       "null = the head's default (isqrt_cov, dropcov, isice 256; bcnn and cbp 0, as their authors)", optional=True),
    _K("proj_dim", 8192, "int", "cbp: Tensor Sketch dimension (the representation's length)"),
    _K("cbp_method", "gram", "str", "cbp: gram = the Tensor Sketch of X X^T, fft = the same result as the "
       "paper computes it, sketches multiplied through FFTs (slower in MindSpore 2.8)", choices=["gram", "fft"]),
    _K("dropcov_eca_kernel", 3, "int", "dropcov: kernel of the ECA 1-D conv across channels (odd; DropCov's 3)"),
    _K("dropcov_rate_scale", 10.0, "float",
       "dropcov: a in the adaptive dropout rate p = 1 - a / log2(d) * mean cos(ECA weights, covariance row sums)"),
    _K("isice_steps", 5, "int", "isice: projected-gradient steps of the sparse inverse covariance (iSICE's 5)"),
    _K("isice_sparsity", 0.01, "float", "isice: l1 weight lambda of the sparse inverse covariance (iSICE's 0.01)"),
    _K("isice_step_size", 1.0, "float", "isice: step size eta of the first step, decaying linearly to 0 (iSICE's 1.0)"),
    _K("isice_ns_iter", 7, "int", "isice: Newton-Schulz iterations of each inverse square root (iSICE's 7)"),
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
    _K("grad_accumulation_steps", 1, "int", "micro-batches of batch_size per update (steps and epochs count "
       "updates): each update sees batch_size*device_num*grad_accumulation_steps images"),
    _K("lr_base_batch", 160, "int", "total batch the lr is tuned for: lr is scaled by "
       "batch_size*device_num*grad_accumulation_steps/lr_base_batch"),
    _K("num_parallel_workers", 8, "int", "data pipeline workers per machine, divided among its ranks (each at most "
       "its share of the CPUs)"),
    _K("prefetch_size", 16, "int", "rows each pipeline stage buffers ahead"),
    _K("bad_image_mode", "replace", "str",
       "undecodable images: replace (by another sample; keeps shards equal), skip, or error (stop)",
       choices=["replace", "skip", "error"]),
    _K("demo_dataset", "", "str", "'digits': write scikit-learn's digits to data_path first if it has no train/",
       choices=["", "digits"]),
    _K("epoch_size", 65, "int", "number of training epochs"),
    _K("optimizer", "momentum", "str", "momentum = SGD with momentum (weight decay as an L2 term); adamw = PyTorch's "
       "AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay; momentum unused)", choices=["momentum", "adamw"]),
    _K("momentum", 0.9, "float", "SGD momentum"),
    _K("weight_decay", 1e-4, "float", "weight decay: L2 for momentum, decoupled (p <- p (1 - lr wd)) for adamw"),
    _K("no_decay_bn_bias", False, "bool", "exclude BatchNorm parameters and biases from weight decay"),
    _K("lr", 0.1, "float", "peak learning rate for a total batch of lr_base_batch"),
    _K("lr_schedule", "step", "str", "learning-rate schedule", choices=["step", "cosine"]),
    _K("lr_milestones", [30, 45, 60], "int_list", "step schedule: epochs at which the lr is multiplied by lr_gamma"),
    _K("lr_gamma", 0.1, "float", "step schedule: lr factor at each milestone"),
    _K("warmup_epochs", 0.0, "float", "linear warm-up length in epochs (per step, fractions allowed)"),
    _K("warmup_lr_init", 0.0, "float", "lr at the first warm-up step (absolute, not scaled)"),
    _K("lr_end", 0.0, "float", "cosine schedule: final lr (absolute, not scaled)"),
    _K("classifier_lr_factor", 1.0, "float", "lr multiplier of the classifier (fast-MPN-COV's classifier_factor)"),
    _K("classifier_weight_decay", None, "float", "weight decay of the classifier; null = weight_decay "
       "(fast-MPN-COV finetunes VGG classifiers with 0)", optional=True),
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
    _K("freeze_layers", 0, "int",
       "do not train the first N backbone stages (ResNet: stem, layer1-4; VGG: conv blocks). fast-MPN-COV's "
       "--freezed-layer counts modules instead: its 5 on a ResNet (conv1, bn1, relu, maxpool, layer1) is 2 here"),
    _K("freeze_backbone_epochs", 0, "int",
       "two-stage finetuning: train only the head (representation + classifier) for the first N epochs, then all"),
]
SCHEMA_BY_NAME = {k.name: k for k in SCHEMA}

_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "True or False",
               "int_list": "a list of integers", "float_list": "a list of numbers",
               "size": "an integer or a [height, width] list of two integers"}

# Lower bounds of integer / float keys (inclusive), checked after merging.
_MIN = {"device_id": 0, "device_num": 1, "num_classes": 1, "iter_num": 1, "dimension_reduction": 0, "proj_dim": 2,
        "image_size": 1, "batch_size": 1, "lr_base_batch": 1, "num_parallel_workers": 1, "prefetch_size": 1,
        "grad_accumulation_steps": 1,
        "epoch_size": 1, "momentum": 0.0, "weight_decay": 0.0, "lr": 0.0, "lr_gamma": 0.0,
        "warmup_epochs": 0.0, "warmup_lr_init": 0.0, "lr_end": 0.0, "classifier_lr_factor": 0.0,
        "classifier_weight_decay": 0.0, "label_smoothing": 0.0, "loss_scale": 1.0, "loss_scale_window": 1,
        "log_interval": 1, "eval_interval": 1, "save_every_epochs": 1, "keep_checkpoint_max": 1,
        "max_steps_per_epoch": 0, "seed": 0, "top_k": 1, "freeze_layers": 0, "freeze_backbone_epochs": 0,
        "dropcov_eca_kernel": 1, "dropcov_rate_scale": 0.0, "isice_steps": 1, "isice_sparsity": 0.0,
        "isice_step_size": 0.0, "isice_ns_iter": 1}
