"""The train stage: split, loaders, model, fit, and the stage's metrics and plots."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from cvplay import paths
from cvplay.config import Params
from cvplay.data import PackedLoader, folder_loader, load_packed, split_indices
from cvplay.engine import FitResult, fit, make_schedule, pick_device, set_seed
from cvplay.io import write_json
from cvplay.models import MODEL_INPUTS, build_model, count_parameters
from cvplay.plots import plot_history, write_history
from cvplay.transfer import FeatureLoader, transfer_optimizer


def make_loaders(params: Params, device: torch.device):
    """Train and val loaders over the fixed split of the prepared training set."""
    packed = load_packed(paths.PACKED_TRAIN)
    train_idx, val_idx = split_indices(len(packed.labels), params.data.val_split, params.seed)
    t = params.train
    if MODEL_INPUTS[params.model] == "features":
        common = {"batch_size": t.batch_size, "device": device, "seed": params.seed}
        train = FeatureLoader(paths.FEATURES_TRAIN, train_idx, train=True, **common)
        val = FeatureLoader(paths.FEATURES_TRAIN, val_idx, train=False, **common)
    elif t.loader == "packed":
        common = {"batch_size": t.batch_size, "device": device, "seed": params.seed}
        train = PackedLoader(packed, train_idx, train=True, **common)
        val = PackedLoader(packed, val_idx, train=False, **common)
    else:
        common = {"device": device, "seed": params.seed, "num_workers": t.num_workers}
        train = folder_loader(
            paths.TRAIN_DIR, train_idx, batch_size=t.batch_size, train=True, **common
        )
        val = folder_loader(
            paths.TRAIN_DIR, val_idx, batch_size=t.batch_size, train=False, **common
        )
    return train, val, packed.classes, len(train_idx), len(val_idx)


def _log_epoch(row: dict) -> None:
    print(
        f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.3g}"
        f"  {row['seconds']:.0f}s",
        flush=True,
    )


def run_train(params: Params) -> FitResult:
    set_seed(params.seed)
    device = pick_device()
    train, val, classes, n_train, n_val = make_loaders(params, device)
    model = build_model(params.model, num_classes=len(classes), model_args=params.model_kwargs())
    optimizer = schedule = None
    if MODEL_INPUTS[params.model] == "features":
        # layer4 starts from the same backbone the features stage ran.
        model.layer4.load_state_dict(torch.load(paths.FEATURES_LAYER4, weights_only=True))
        tr = params.transfer
        optimizer = transfer_optimizer(model, tr.lr_head, tr.lr_layer4, tr.weight_decay)
        schedule = make_schedule(optimizer, replace(params.train, scheduler="plateau"), len(train))
    model = model.to(device)
    print(
        f"{params.model}: {count_parameters(model):,} parameters on {device}; "
        f"train/val {n_train}/{n_val} images, loader {params.train.loader}",
        file=sys.stderr,
    )
    meta = {"config": params.to_dict(), "classes": classes}
    result = fit(
        model,
        train,
        val,
        params.train,
        checkpoint_dir=paths.MODELS,
        checkpoint_meta=meta,
        on_epoch=_log_epoch,
        optimizer=optimizer,
        schedule=schedule,
    )
    write_history(paths.HISTORY_CSV, result.history)
    plot_history(result.history, paths.CURVES_PNG, title=params.model)
    write_json(
        paths.METRICS_TRAIN,
        {
            "val_acc": result.best_val_acc,
            "val_loss": result.best_val_loss,
            "best_epoch": result.best_epoch,
            "final_train_acc": result.history[-1]["train_acc"],
            "train_seconds": round(result.train_seconds, 1),
            "params": count_parameters(model),
        },
    )
    return result
