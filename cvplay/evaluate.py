"""The evaluate stage: score ``models/best.pt`` on the test split."""

from __future__ import annotations

from pathlib import Path

import torch

from cvplay import paths
from cvplay.config import Params, params_from_dict
from cvplay.data import load_packed
from cvplay.engine import pick_device, predict_logits, tta_views
from cvplay.errors import CvplayError
from cvplay.io import write_json
from cvplay.loaders import PackedLoader
from cvplay.models import MODEL_INPUTS, build_model
from cvplay.plots import plot_confusion, plot_image_grid, write_confusion_pairs, write_per_class
from cvplay.transfer import FeatureLoader


def load_checkpoint(path: Path, device: torch.device) -> tuple[torch.nn.Module, Params, dict]:
    """Rebuild the model a checkpoint was trained as; tensors and plain data only."""
    if not path.exists():
        raise CvplayError(f"{path}: not found; run 'dvc repro train' first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with UnpicklingError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CvplayError(f"{path}: not a cvplay checkpoint or unsafe to load ({first})") from None
    cfg = params_from_dict(ckpt["config"])
    model = build_model(
        cfg.model, num_classes=len(ckpt["classes"]), model_args=cfg.model_kwargs(for_loading=True)
    )
    model.load_state_dict(ckpt["model"])
    return model.to(device), cfg, ckpt


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(labels * n + preds, minlength=n * n).view(n, n)


def run_evaluate(params: Params) -> dict:
    device = pick_device()
    model, cfg, ckpt = load_checkpoint(paths.BEST, device)
    if cfg.model != params.model:
        raise CvplayError(
            f"{paths.BEST}: trained as model {cfg.model!r} but params.yaml says {params.model!r}; "
            "run 'dvc repro' to retrain"
        )
    common = {"batch_size": params.eval.batch_size, "device": device, "train": False, "seed": 0}
    if MODEL_INPUTS[cfg.model] == "features":
        test_path = paths.FEATURES_TEST
        loader = FeatureLoader(test_path, None, **common)
        test_classes = loader.classes
    else:
        test_path = paths.PACKED_TEST
        test = load_packed(test_path)
        loader = PackedLoader(test, torch.arange(len(test.labels)), **common)
        test_classes = test.classes
    classes = ckpt["classes"]
    if test_classes != classes:
        raise CvplayError(
            f"{test_path}: classes {test_classes} differ from the checkpoint's {classes}; "
            "run 'dvc repro' to retrain on the prepared data"
        )
    # auto follows the augmentation the checkpoint was trained with
    tta = tta_views(params.eval.tta, cfg)
    logits, labels = predict_logits(model, loader, tta=tta)
    preds = logits.argmax(1)
    n = len(classes)
    cm = confusion_matrix(labels, preds, n)
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    metrics = {
        "test_acc": (preds == labels).float().mean().item(),
        "test_loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "best_epoch": ckpt["epoch"],
        "per_class_acc": {c: round(a, 4) for c, a in zip(classes, per_class, strict=True)},
    }
    write_json(paths.METRICS_EVAL, metrics)
    write_confusion_pairs(paths.CONFUSION_CSV, labels, preds, classes)
    plot_confusion(cm, classes, paths.CONFUSION_PNG)
    write_per_class(paths.PER_CLASS_CSV, classes, per_class)
    test_images = load_packed(paths.PACKED_TEST).images
    plot_mistakes(logits, labels, test_images, classes, paths.MISCLASSIFIED_PNG)
    return metrics


def plot_mistakes(
    logits: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    classes: list[str],
    path,
    n: int = 32,
) -> torch.Tensor:
    """Plot the ``n`` test images the model got wrong with the highest confidence; return
    their indices, most confident first."""
    prob, pred = logits.softmax(1).max(1)
    wrong = (pred != labels).nonzero().squeeze(1)
    worst = wrong[prob[wrong].argsort(descending=True, stable=True)[:n]]
    captions = [
        f"{classes[t]} → {classes[p]}\n{c:.2f}"
        for t, p, c in zip(
            labels[worst].tolist(), pred[worst].tolist(), prob[worst].tolist(), strict=True
        )
    ]
    plot_image_grid(
        images[worst],
        captions,
        path,
        title=f"most confident mistakes: {len(worst)} of {len(wrong)} wrong "
        "(true → predicted, confidence)",
    )
    return worst
