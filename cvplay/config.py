"""Typed view of params.yaml: one frozen dataclass per section, validated at start-up.

A misspelt key, a wrong type or an unknown choice fails before any work starts, with a
message that names the key and the valid options (``dvc exp run -S`` only overrides keys
that already exist, so every key has its default in params.yaml).

Training recipes: ``models.<name>`` in params.yaml holds each model's best ``train.*``
settings. A ``train.*`` key left ``null`` takes the value from the recipe of the model being
trained (else the ``TrainConfig`` default below); a non-null ``train.*`` value overrides every
recipe. So ``dvc exp run -S model=minivgg`` trains with minivgg's recipe, ``-S train.lr=0.2``
changes the learning rate whatever the model, and ``-S models.minivgg.lr=0.2`` changes
minivgg's recipe only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cvplay.errors import CvplayError

PARAMS_FILE = "params.yaml"


class ConfigError(CvplayError):
    """params.yaml holds a key, type or value the pipeline cannot use."""


SCHEDULERS = ("onecycle", "cosine", "triangle", "plateau", "none")
WARMUP_SCHEDULERS = ("onecycle", "cosine", "triangle")  # the ones that read train.warmup_epochs
ONECYCLE_WARMUP = 0.25  # onecycle's rise when train.warmup_epochs is null: this x epochs
AUGMENTS = ("crop_flip", "crop_altflip", "flip", "none")
CROP_AUGMENTS = ("crop_flip", "crop_altflip")  # the ones that random-crop
PAD_MODES = ("zeros", "reflect")  # cvplay.loaders.PAD_MODES (not imported: torchvision)
OPTIMIZERS = ("sgd", "adamw", "muon")
LOADERS = ("packed", "folder")
BAD_IMAGE_POLICIES = ("error", "skip")  # cvplay.prepare.BAD_IMAGE_POLICIES (not imported: PIL)
# Test-time augmentation: auto = the views the model was trained on (train.augment crop_flip
# or crop_altflip: flip_translate; flip: flip; none: none). cvplay.engine.tta_views resolves it.
TTAS = ("auto", "flip_translate", "flip", "none")
# Keys with a fixed set of values: a value of the wrong type is told the choices too.
CHOICES = {
    "train.scheduler": SCHEDULERS,
    "train.augment": AUGMENTS,
    "train.crop_pad_mode": PAD_MODES,
    "train.optimizer": OPTIMIZERS,
    "train.loader": LOADERS,
    "data.on_bad_image": BAD_IMAGE_POLICIES,
    "eval.tta": TTAS,
}


@dataclass(frozen=True)
class DataConfig:
    # "cifar10" (official archive, data/raw/cifar-10-python.tar.gz or downloaded) or a path
    # to an ImageFolder root holding train/<class>/* and test/<class>/*.
    source: str = "cifar10"
    # Validation images held out of the training set: a count (int) or a fraction (float < 1).
    val_split: int | float = 5000
    # Keep only this many training images per class (null = all): quick runs on real data.
    max_per_class: int | None = None
    # Height and width of the prepared images (packed tensors are N x 3 x image_size x
    # image_size); images of other sizes are resized, bilinear.
    image_size: int = 32
    # An undecodable, truncated or empty image file: "error" stops prepare naming every such
    # file; "skip" leaves them out and lists them in data/prepare_report.json.
    on_bad_image: str = "error"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True  # sgd only
    # optimizer muon: the Nesterov momentum of the hidden matrices (Muon's default 0.95;
    # airbench94_muon: 0.6 at batch 2000). The AdamW parameters keep their betas.
    muon_momentum: float = 0.95  # cvplay.optim.MUON_MOMENTUM (not imported: torch)
    # Weight decay on BatchNorm/LayerNorm weights and on biases too (False: on weights of
    # convolutions and linear layers only, the usual choice).
    decay_norm_bias: bool = False
    # Learning rate of the norm layers' parameters (BatchNorm/LayerNorm scales and shifts) as
    # a multiple of lr (airbench: 64); their weight decay, if decay_norm_bias, is divided by
    # it, so that the decay per step stays lr x weight_decay.
    norm_lr_scale: float = 1.0
    scheduler: str = "onecycle"
    # onecycle: the rise from lr / 25 to lr takes this many epochs (None: ONECYCLE_WARMUP x
    # epochs), then cosine to lr / 25e4; cosine: linear warm-up from 0 over this many epochs
    # (None: 0), then cosine to 0; triangle: linear from 0.2 x lr over this many epochs
    # (None: 0), then linear to 0 (airbench's).
    warmup_epochs: float | None = None
    # ReduceLROnPlateau settings (scheduler: plateau), on val loss as in the notebook.
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    label_smoothing: float = 0.0
    # Exponential moving average of the weights, used for validation and the checkpoints:
    # the decay per step (e.g. 0.99); 0 = off.
    ema: float = 0.0
    # airbench's lookahead: every 5 steps a slow copy of the weights moves toward the live
    # ones by 1 - lookahead^5 x (step/steps)^3 (no averaging early, more as training ends)
    # and the live weights are reset to it; after the last step they take the slow copy.
    # The decay per step (airbench: 0.95); 0 = off.
    lookahead: float = 0.0
    grad_clip: float = 0.0  # clip the global gradient norm to this (0 = off)
    # Training augmentation: "crop_flip" (RandomCrop(32, padding=crop_padding) + horizontal
    # flip), "crop_altflip" (the same crops; airbench's alternating flip: each image mirrored
    # in every other epoch, from a seeded coin; packed loader only), "flip" (flip only) or
    # "none".
    augment: str = "crop_flip"
    # Padding around each image before the random crop: crops shift it by up to this many
    # pixels each way (crop_flip, crop_altflip) ...
    crop_padding: int = 4
    # ... filled with "zeros" (RandomCrop's default) or "reflect" (the image mirrored at its
    # edge, as airbench and Page's ResNet-9 do).
    crop_pad_mode: str = "zeros"
    # Cutout (DeVries & Taylor; Page's ResNet-9): the side in pixels of a square, placed at a
    # random position wholly inside each training image, that is set to the dataset mean (0
    # after normalisation), with any train.augment; 0 = off.
    cutout: int = 0
    # "packed": uint8 tensors resident on the device, batch augmentation by indexing.
    # "folder": torchvision ImageFolder + per-sample transforms in DataLoader workers.
    loader: str = "packed"
    num_workers: int = 2
    # Compute settings (see bench/RESULTS.md for the measurements behind the defaults).
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (first epoch pays the compile time)
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on the CPU (training and validation): faster for the conv nets where the
    # CPU runs bf16 natively (AMX, AVX512-BF16), far slower where it does not (AVX2); the
    # measured figures are in params.yaml's comment and README. Opt in: the weights stay
    # fp32 but the results differ from an fp32 run's.
    amp_cpu: bool = False
    # optimizer muon: its Newton-Schulz iterations in bf16 on the CPU too (always on CUDA, as
    # the reference): 2-3x faster where the CPU has AMX, far slower where it runs bf16 in
    # software (AVX2). Opt in: the results differ from fp32 iterations'.
    muon_bf16_cpu: bool = False
    threads: int = 0  # torch intra-op threads; 0 = PyTorch's default (physical cores)
    # Deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN deterministic,
    # no cudnn.benchmark): bit-identical reruns on a GPU, at some speed. CPU runs are
    # bit-identical without it.
    deterministic: bool = False
    # >1: run the train stage as this many processes under torchrun (DDP; gloo on CPU,
    # NCCL on GPU); batch_size stays the global batch and must divide evenly.
    nproc: int = 1

    def warmup(self) -> float:
        """The warm-up epochs the scheduler uses: train.warmup_epochs, or its default."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return ONECYCLE_WARMUP * self.epochs if self.scheduler == "onecycle" else 0.0


@dataclass(frozen=True)
class ModelArgs:
    # BatchNorm in simplecnn, simpleresnet and minivgg (build_model refuses a key the model
    # does not take unless it is at its default).
    use_bn: bool = True
    # simpleresnet and preactresnet18: each residual branch's last layer (BN scale, or
    # conv) starts at zero, so every block starts as its shortcut.
    zero_init_residual: bool = False


@dataclass(frozen=True)
class FeaturesConfig:
    # "imagenet" (torchvision's ResNet18_Weights.DEFAULT via the torch hub cache), a path to a
    # ResNet18 state_dict file, or "none" (random init, for tests).
    weights: str = "imagenet"
    # Images are resized to this before the backbone (layer3 output: image_size/16 squared).
    image_size: int = 64
    # 1: features of the images; 2: also of their horizontal flips (train split only).
    views: int = 2
    batch_size: int = 256


@dataclass(frozen=True)
class TransferConfig:
    # model=resnet18: layer4 + MLP head (512 -> hidden -> classes) with Dropout.
    hidden: int = 256
    dropout: float = 0.3
    lr_head: float = 1e-3
    lr_layer4: float = 1e-4
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 500
    # Test-time augmentation for validation during training and for the test split (image
    # models only): average the logits of several views of each image. flip: the image and
    # its mirror; flip_translate: those two (weight 1/2) and both mirrored copies shifted one
    # pixel up-left and one down-right (1/2); auto: flip_translate for models trained with
    # crop_flip or crop_altflip, flip for flip, none for none.
    tta: str = "auto"


@dataclass(frozen=True)
class Params:
    model: str = "simplecnn"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Per-model recipes: model name -> train.* keys (see the module docstring).
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_kwargs(self, *, for_loading: bool = False) -> dict[str, Any]:
        """Everything a model builder may take; build_model passes each only what it declares.

        for_loading: the state_dict comes from a checkpoint, so skip loading backbone weights.
        """
        return {
            **asdict(self.model_args),
            "hidden": self.transfer.hidden,
            "dropout": self.transfer.dropout,
            "weights": "none" if for_loading else self.features.weights,
            "image_size": self.features.image_size,
        }


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _matches(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # YAML writes 1 for 1.0; bool is an int subclass and never a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    # models.<name>.<key> takes the choices of train.<key>
    key = "train." + path.rsplit(".", 1)[-1] if path.startswith("models.") else path
    choices = CHOICES.get(key)
    hint = f"; choose one of: {', '.join(choices)}" if choices else ""
    return ConfigError(f"{PARAMS_FILE}: {path}: expected {_type_name(tp)}, got {value!r}{hint}")


def _key_path(where: str, key: str) -> str:
    # where is "" at the top level, else the section name: "train" + "epochs" -> "train.epochs"
    return f"{where}.{key}" if where else key


def _build(cls: type, raw: Any, where: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: {where or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = _key_path(where, str(key))
        if key not in hints:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{PARAMS_FILE}: {path}: unknown key; {hint}valid keys: {', '.join(valid)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
            continue
        if not _matches(value, tp):
            raise _type_error(path, tp, value)
        kwargs[key] = _coerce(value, tp)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> Any:
    """YAML writes 1 for 1.0: an int for a float or float | None key (not int | float)
    becomes a float."""
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    args = typing.get_args(tp) if union else (tp,)
    is_float = float in args and int not in args
    return float(value) if is_float and isinstance(value, int) else value


def _choice(value: str, valid: tuple[str, ...] | list[str], key: str) -> None:
    if value not in valid:
        raise ConfigError(
            f"{PARAMS_FILE}: {key}: unknown choice {value!r}; choose one of: {', '.join(valid)}"
        )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{PARAMS_FILE}: {key}: {message}")


def validate(params: Params) -> Params:
    """Choices and ranges that types alone don't catch."""
    from cvplay.models import MODELS  # late: models import torch, config stays light

    _choice(params.model, sorted(MODELS), "model")
    for name in params.models:
        _choice(name, sorted(MODELS), f"models.{name}")
    _check(
        params.model in params.models,
        f"models.{params.model}",
        "missing; every model needs its recipe (train.* keys) under models:",
    )
    d, t = params.data, params.train
    _check(
        (isinstance(d.val_split, int) and d.val_split >= 1)
        or (isinstance(d.val_split, float) and 0 < d.val_split < 1),
        "data.val_split",
        f"must be a count >= 1 or a fraction between 0 and 1, got {d.val_split!r}",
    )
    _check(
        d.max_per_class is None or d.max_per_class >= 1,
        "data.max_per_class",
        "must be null (all images) or >= 1",
    )
    _check(bool(d.source.strip()), "data.source", "must be 'cifar10' or a folder path")
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8 (pixels), got {d.image_size}")
    _choice(d.on_bad_image, BAD_IMAGE_POLICIES, "data.on_bad_image")
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _check(
        0 <= t.muon_momentum < 1,
        "train.muon_momentum",
        f"must be in [0, 1) (Muon's default: {TrainConfig.muon_momentum}), got {t.muon_momentum}",
    )
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _check(0 < t.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)")
    _check(t.plateau_patience >= 0, "train.plateau_patience", "must be >= 0")
    _check(t.num_workers >= 0, "train.num_workers", "must be >= 0")
    _check(t.threads >= 0, "train.threads", "must be >= 0 (0 = PyTorch's default)")
    _check(t.nproc >= 1, "train.nproc", f"must be >= 1, got {t.nproc}")
    _check(
        t.batch_size % t.nproc == 0,
        "train.batch_size",
        f"{t.batch_size} does not split evenly over train.nproc={t.nproc} processes",
    )
    _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    _choice(t.scheduler, SCHEDULERS, "train.scheduler")
    _choice(t.augment, AUGMENTS, "train.augment")
    _choice(t.crop_pad_mode, PAD_MODES, "train.crop_pad_mode")
    _check(
        1 <= t.crop_padding <= 16,
        "train.crop_padding",
        f"must be between 1 and 16 (pixels), got {t.crop_padding}",
    )
    _check(
        0 <= t.cutout < d.image_size,
        "train.cutout",
        f"must be between 0 (off) and data.image_size - 1 = {d.image_size - 1} (pixels),"
        f" got {t.cutout}",
    )
    _check(t.norm_lr_scale > 0, "train.norm_lr_scale", f"must be > 0, got {t.norm_lr_scale}")
    if t.warmup_epochs is not None:
        _check(t.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0 (null = the default)")
        _check(
            t.warmup_epochs < t.epochs or t.scheduler not in WARMUP_SCHEDULERS,
            "train.warmup_epochs",
            f"{t.warmup_epochs} must be less than train.epochs={t.epochs}",
        )
        _check(
            t.warmup_epochs > 0 or t.scheduler != "onecycle",
            "train.warmup_epochs",
            f"onecycle needs a rise: > 0 epochs, or null for {ONECYCLE_WARMUP:g} x train.epochs",
        )
    _check(0 <= t.ema < 1, "train.ema", f"must be in [0, 1) (0 = off), got {t.ema}")
    _check(
        0 <= t.lookahead < 1,
        "train.lookahead",
        f"must be in [0, 1) (0 = off; airbench: 0.95), got {t.lookahead}",
    )
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    _choice(t.loader, LOADERS, "train.loader")
    _check(
        t.augment != "crop_altflip" or t.loader == "packed",
        "train.augment",
        "crop_altflip needs train.loader: packed (the folder loader's per-sample transforms"
        " know no epoch); use crop_flip with the folder loader",
    )
    _check(params.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _choice(params.eval.tta, TTAS, "eval.tta")
    f, tr = params.features, params.transfer
    _check(f.image_size >= 32, "features.image_size", f"must be >= 32, got {f.image_size}")
    _check(f.views in (1, 2), "features.views", f"must be 1 or 2, got {f.views}")
    _check(f.batch_size >= 1, "features.batch_size", "must be >= 1")
    _check(bool(f.weights.strip()), "features.weights", "must be 'imagenet', 'none' or a path")
    _check(tr.hidden >= 1, "transfer.hidden", "must be >= 1")
    _check(0 <= tr.dropout < 1, "transfer.dropout", "must be in [0, 1)")
    _check(tr.lr_head > 0 and tr.lr_layer4 > 0, "transfer.lr_head/lr_layer4", "must be > 0")
    _check(tr.weight_decay >= 0, "transfer.weight_decay", "must be >= 0")
    return params


def _partial(cls: type, raw: Any, where: str) -> dict[str, Any]:
    """The non-null keys of a partial section of ``cls``, checked like ``_build`` does."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: {where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    out = {}
    for key, value in raw.items():
        path = _key_path(where, str(key))
        if key not in hints:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{PARAMS_FILE}: {path}: unknown key; {hint}valid keys: {', '.join(valid)}"
            )
        if value is None:
            continue
        tp = hints[key]
        if not _matches(value, tp):
            raise _type_error(path, tp, value)
        out[key] = _coerce(value, tp)
    return out


def _recipes(raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: models: expected a mapping of model name to train keys")
    return {
        str(name): _partial(TrainConfig, recipe, f"models.{name}") for name, recipe in raw.items()
    }


def parse_params(raw: Any) -> Params:
    """Build and validate Params; ``train`` is resolved against the model's recipe."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: top level: expected a mapping, got {raw!r}")
    rest = {k: v for k, v in raw.items() if k not in ("train", "models")}
    params = _build(Params, rest)
    recipes = _recipes(raw.get("models"))
    explicit = _partial(TrainConfig, raw.get("train"), "train")
    train = TrainConfig(**{**recipes.get(params.model, {}), **explicit})
    return validate(dataclasses.replace(params, train=train, models=recipes))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return parse_params(raw)


def params_from_dict(resolved: dict[str, Any]) -> Params:
    """Rebuild Params from a checkpoint's saved config (same validation).

    Checkpoints from before ``eval.tta`` had choices stored a bool: true meant flip. Those
    from before onecycle read ``train.warmup_epochs`` stored 0.0 with it, which meant its
    fixed rise of ONECYCLE_WARMUP x epochs: now null.
    """
    tta = resolved.get("eval", {}).get("tta")
    if isinstance(tta, bool):
        resolved = {**resolved, "eval": {**resolved["eval"], "tta": "flip" if tta else "none"}}
    train = resolved.get("train", {})
    if train.get("scheduler") == "onecycle" and train.get("warmup_epochs") == 0:
        resolved = {**resolved, "train": {**train, "warmup_epochs": None}}
    return parse_params(resolved)
