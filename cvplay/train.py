"""The train stage: split, loaders, model, fit, and the stage's metrics and plots."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import asdict, replace

import torch
from torch import nn

from cvplay import paths
from cvplay.config import CROP_AUGMENTS, Params, TrainConfig
from cvplay.data import Normalize, Packed, load_packed, split_indices
from cvplay.distributed import Dist, close_distributed, init_distributed
from cvplay.engine import (
    FitResult,
    amp_enabled,
    cpu_runs_bf16_natively,
    fit,
    machine,
    make_schedule,
    pick_device,
    set_seed,
    tta_views,
    unwrap,
)
from cvplay.errors import CvplayError
from cvplay.io import write_json
from cvplay.loaders import PackedLoader, augmented_samples, folder_loader
from cvplay.models import MODEL_INPUTS, build_model, count_parameters, forward_flops
from cvplay.optim import newton_schulz_in_bf16
from cvplay.plots import plot_history, plot_image_grid, write_history
from cvplay.resume import ResumeStore, run_key
from cvplay.transfer import FeatureLoader, transfer_optimizer


def make_loaders(
    params: Params, packed: Packed, device: torch.device, ddp: Dist, channels_last: bool
):
    """Train and val loaders over the fixed split of the prepared training set."""
    train_idx, val_idx = split_indices(len(packed.labels), params.data.val_split, params.seed)
    t = params.train
    common = {
        "batch_size": t.batch_size,
        "device": device,
        "seed": params.seed,
        "rank": ddp.rank,
        "world": ddp.world,
    }
    aug = {
        "augment": t.augment,
        "crop_padding": t.crop_padding,
        "crop_pad_mode": t.crop_pad_mode,
        "cutout": t.cutout,
    }
    if MODEL_INPUTS[params.model] == "features":
        train = FeatureLoader(paths.FEATURES_TRAIN, train_idx, train=True, **common)
        val = FeatureLoader(paths.FEATURES_TRAIN, val_idx, train=False, **common)
    elif t.loader == "packed":
        fmt = {"channels_last": channels_last}
        train = PackedLoader(packed, train_idx, train=True, **aug, **common, **fmt)
        val = PackedLoader(packed, val_idx, train=False, **common, **fmt)
    elif ddp.world > 1:
        raise CvplayError(
            "params.yaml: train.loader: 'folder' does not shard over processes; "
            "use train.loader=packed with train.nproc > 1"
        )
    else:
        common = {"device": device, "seed": params.seed, "num_workers": t.num_workers}
        train = folder_loader(
            paths.TRAIN_DIR,
            train_idx,
            batch_size=t.batch_size,
            train=True,
            **aug,
            **common,
        )
        val = folder_loader(
            paths.TRAIN_DIR, val_idx, batch_size=t.batch_size, train=False, **common
        )
    return train, val, train_idx, val_idx


DATA_INIT_IMAGES = 5000  # airbench's whitening sample size


def seeded_draw(train_idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Up to ``n`` of ``train_idx`` in a seeded random order (the prepared images are sorted
    by class, so the first ones would all be airplanes); the same on every rank."""
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    return train_idx[order[:n]]


def data_init_sample(packed: Packed, train_idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Normalised float images for models that set layers from the data (``data_init``):
    a seeded draw of up to DATA_INIT_IMAGES training images."""
    chosen = seeded_draw(train_idx, DATA_INIT_IMAGES, seed)
    return Normalize(torch.device("cpu"))(packed.images[chosen])


def _log_epoch(row: dict) -> None:
    print(
        f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.3g}"
        f"  {row['seconds']:.0f}s",
        flush=True,
    )


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare_model(
    model: nn.Module, t: TrainConfig, device: torch.device, ddp: Dist, channels_last: bool
) -> nn.Module:
    """Device, memory format, DDP and torch.compile, in the order they compose."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    if ddp.world > 1:
        device_ids = [ddp.local_rank] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if t.compile:
        model = torch.compile(model)
    return model


def configure_compute(t: TrainConfig, device: torch.device) -> None:
    if t.deterministic:
        # cuBLAS needs a fixed workspace for deterministic GEMMs (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    # Denormal floats (tiny gradients once a batch is fitted) run ~100x slower on x86 CPUs;
    # flushing them to zero changes no result that matters and keeps steps at full speed.
    torch.set_flush_denormal(True)
    if device.type == "cuda" and not t.deterministic:
        # Fixed input shapes: let cuDNN pick the fastest kernels once (its choice may vary
        # from run to run, and so may the last bits of the results: train.deterministic).
        torch.backends.cudnn.benchmark = True


class PauseAt:
    """Test hook: with CVPLAY_PAUSE_AT=EPOCH:BATCH in the environment, training prints
    ``paused at EPOCH:BATCH`` and waits for a signal when this process is about to train batch
    BATCH of its EPOCH-th epoch (BATCH 0: at the epoch boundary, before the epoch draws any
    random number). Lets tests interrupt a real run at an exact point. Otherwise the loader
    is used as is."""

    def __init__(self, loader, epoch: int, batch: int):
        self.loader, self.epoch, self.batch, self.epochs_seen = loader, epoch, batch, 0

    @classmethod
    def wrap(cls, loader):
        spec = os.environ.get("CVPLAY_PAUSE_AT")
        if not spec:
            return loader
        epoch, batch = (int(v) for v in spec.split(":"))
        return cls(loader, epoch, batch)

    def __getattr__(self, name):  # len(), generator, ... of the wrapped loader
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _pause(self, batch: int) -> None:
        print(f"paused at {self.epochs_seen}:{batch}", flush=True)
        while True:
            signal.pause()

    def __iter__(self):
        self.epochs_seen += 1
        here = self.epochs_seen == self.epoch
        if here and self.batch == 0:
            self._pause(0)
        for i, item in enumerate(self.loader):
            if here and i == self.batch:
                self._pause(i)
            yield item


def run_train(params: Params) -> FitResult | None:
    """Train params.model; under torchrun every rank calls this and rank 0 writes."""
    ddp = init_distributed()
    try:
        return _run_train(params, ddp)
    finally:
        close_distributed()


def _run_train(params: Params, ddp: Dist) -> FitResult | None:
    set_seed(params.seed)
    device = pick_device(ddp.local_rank)
    configure_compute(params.train, device)
    packed = load_packed(paths.PACKED_TRAIN)
    classes = packed.classes
    model = build_model(params.model, num_classes=len(classes), model_args=params.model_kwargs())
    # NHWC helps convolutions only; for the MLP it would cost a copy per batch (measured).
    channels_last = params.train.channels_last and has_conv(model)
    train, val, train_idx, val_idx = make_loaders(params, packed, device, ddp, channels_last)
    n_train, n_val = len(train_idx), len(val_idx)
    n_params = count_parameters(model)
    images = MODEL_INPUTS[params.model] == "images"
    flops = forward_flops(model, torch.zeros(2, *packed.images.shape[1:])) if images else None
    if hasattr(model, "data_init"):
        model.data_init(data_init_sample(packed, train_idx, params.seed))
    optimizer = schedule = None
    if MODEL_INPUTS[params.model] == "features":
        # layer4 starts from the same backbone the features stage ran.
        model.layer4.load_state_dict(torch.load(paths.FEATURES_LAYER4, weights_only=True))
    model = prepare_model(model, params.train, device, ddp, channels_last)
    if MODEL_INPUTS[params.model] == "features":
        tr = params.transfer
        optimizer = transfer_optimizer(unwrap(model), tr.lr_head, tr.lr_layer4, tr.weight_decay)
        schedule = make_schedule(optimizer, replace(params.train, scheduler="plateau"), len(train))
    if ddp.is_main:
        loader = "features" if MODEL_INPUTS[params.model] == "features" else params.train.loader
        print(
            f"{params.model}: {n_params:,} parameters on {device} x {ddp.world} process(es); "
            f"train/val {n_train}/{n_val} images, loader {loader}",
            file=sys.stderr,
        )
        recipe = ", ".join(f"{k}={v}" for k, v in asdict(params.train).items())
        print(f"train: {recipe}", file=sys.stderr)
        t = params.train
        bf16_keys = [
            k for k, on in (("amp_cpu", t.amp_cpu), ("muon_bf16_cpu", t.muon_bf16_cpu)) if on
        ]
        if device.type == "cpu" and bf16_keys and not cpu_runs_bf16_natively():
            for key in bf16_keys:
                print(
                    f"warning: train.{key} is on but this CPU has neither AMX nor AVX512-BF16, "
                    f"so bf16 runs slower than fp32 here; set train.{key}: false",
                    file=sys.stderr,
                )
    meta = {"config": params.to_dict(), "classes": classes}
    data_files = (
        [paths.FEATURES_TRAIN, paths.FEATURES_LAYER4]
        if MODEL_INPUTS[params.model] == "features"
        else [paths.PACKED_TRAIN]
    )
    config = {k: v for k, v in params.to_dict().items() if k != "models"}
    resume = ResumeStore(
        run_key(config, data_files, device=device.type, world=ddp.world), write=ddp.is_main
    )
    result = fit(
        model,
        PauseAt.wrap(train),
        val,
        params.train,
        checkpoint_dir=paths.MODELS,
        checkpoint_meta=meta,
        on_epoch=_log_epoch if ddp.is_main else None,
        optimizer=optimizer,
        schedule=schedule,
        device=device,
        write=ddp.is_main,
        tta=tta_views(params.eval.tta, params),
        resume=resume,
    )
    if not ddp.is_main:
        return None
    write_history(paths.HISTORY_CSV, result.history)
    plot_history(result.history, paths.CURVES_PNG, title=params.model)
    shown = seeded_draw(train_idx, 32, params.seed)  # 32 training images
    augment = params.train.augment if images else "none"
    pad, pad_mode = params.train.crop_padding, params.train.crop_pad_mode
    cutout = params.train.cutout if images else 0
    plot_image_grid(
        augmented_samples(packed.images[shown], augment, params.seed, pad, pad_mode, cutout),
        [classes[i] for i in packed.labels[shown].tolist()],
        paths.AUGMENTED_PNG,
        title=f"training samples as {params.model} sees them (augment: {augment}"
        + (f", padding {pad} {pad_mode}" if augment in CROP_AUGMENTS else "")
        + (f", cutout {cutout}" if cutout else "")
        + "; "
        "before normalisation)",
    )
    # metrics/ holds only what params, seed and data decide (byte-identical across runs on
    # the CPU); timings are the machine's and go to logs/.
    write_json(
        paths.METRICS_TRAIN,
        {
            "val_acc": result.best_val_acc,
            "val_loss": result.best_val_loss,
            "best_epoch": result.best_epoch,
            "final_train_acc": result.history[-1]["train_acc"],
            "epochs": params.train.epochs,
            "params": n_params,
            "checkpoint_mb": round(paths.BEST.stat().st_size / 1e6, 2),
            **({"forward_mflops": round(flops / 1e6, 2)} if flops is not None else {}),
        },
    )
    newton_schulz = "none"  # Muon's orthogonalization precision (train.muon_bf16_cpu)
    if params.train.optimizer == "muon":
        bf16 = newton_schulz_in_bf16(device, params.train.muon_bf16_cpu)
        newton_schulz = "bf16" if bf16 else "fp32"
    write_json(
        paths.TIMING_TRAIN,
        {
            "train_seconds": round(result.train_seconds, 1),
            # training images per second over the whole fit (validation time included)
            "images_per_s": round(n_train * params.train.epochs / result.train_seconds, 1),
            "device": device.type,
            "autocast": "bf16" if amp_enabled(params.train, device) else "none",
            "newton_schulz": newton_schulz,
            "processes": ddp.world,
            "machine": machine(),
        },
    )
    resume.clear()
    return result
