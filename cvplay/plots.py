"""Plot files: CSV series that ``dvc plots`` renders, and matplotlib PNGs (the notebook's)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
import torch

from cvplay.io import atomic_path, write_text

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def write_csv(path: str | Path, fieldnames: Sequence[str], rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_history(path: str | Path, history: Sequence[dict]) -> None:
    write_csv(path, HISTORY_FIELDS, history)


def write_confusion_pairs(
    path: str | Path, labels: torch.Tensor, preds: torch.Tensor, classes: Sequence[str]
) -> None:
    """One (actual, predicted) row per test image: the input of DVC's confusion template."""
    rows = [
        {"actual": classes[a], "predicted": classes[p]}
        for a, p in zip(labels.tolist(), preds.tolist(), strict=True)
    ]
    write_csv(path, ("actual", "predicted"), rows)


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_history(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """The notebook's curves: loss and accuracy per epoch, train and val overlaid."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def write_per_class(path: str | Path, classes: Sequence[str], accuracy: Sequence[float]) -> None:
    """Test accuracy per class: the input of DVC's bar_horizontal template."""
    rows = [{"class": c, "accuracy": round(a, 4)} for c, a in zip(classes, accuracy, strict=True)]
    write_csv(path, ("class", "accuracy"), rows)


def plot_image_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    *,
    title: str,
    ncols: int = 8,
    colors: Sequence[str] | None = None,
) -> None:
    """uint8 N x 3 x H x W images in a grid, each with a caption (and caption colour)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.55 * ncols, 1.75 * nrows + 0.4), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            color = colors[i] if colors is not None else "black"
            ax.set_title(captions[i], fontsize=7, color=color)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (each row: where one true class went)."""
    norm = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(n):
        for j in range(n):
            v = norm[i, j].item()
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > 0.5 else "black",
            )
    ax.set_title("test confusion matrix (row-normalised)")
    _save(fig, path)
