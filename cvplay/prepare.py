"""The prepare stage: turn a data source into ``data/{train,test}/<class>/*.png`` + packed tensors.

Sources:
- ``cifar10``: the official ``cifar-10-python.tar.gz`` at ``data/raw/`` (downloaded there with
  torchvision's checksum verification when absent and online);
- a path to an ImageFolder root holding ``train/<class>/*`` and ``test/<class>/*`` in any
  image format PIL reads.

Every image becomes 32x32 RGB. Besides the PNG tree (any ImageFolder tool can read it),
each split is also written as one uint8 tensor file ``data/packed/<split>.pt`` that the
fast training path loads in one go.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvplay.errors import CvplayError
from cvplay.io import atomic_dir, atomic_path, write_json

IMAGE_SIZE = 32
SPLITS = ("train", "test")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# What counts as an image in a source folder (others, e.g. .DS_Store or README.txt, are ignored).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# Below this many images the process pool costs more than it saves.
_POOL_MIN_IMAGES = 2000


class DataSourceError(CvplayError):
    """The data source is missing, malformed or unreadable."""


@dataclass
class Split:
    """One split in memory: uint8 images N x 32 x 32 x 3 (HWC), labels, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


# --------------------------------------------------------------------------- cifar10 archive


def _offline_message(archive: Path, reason: str) -> str:
    return (
        f"cannot download CIFAR-10 ({reason}); put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) "
        f"at {archive}, or point data.source at a local ImageFolder copy, e.g. "
        "'dvc exp run -S data.source=../shared/data/cifar10-jpg'"
    )


def fetch_cifar10_archive(raw_dir: Path) -> Path:
    """Return the verified official archive in ``raw_dir``, downloading it if absent."""
    from torchvision.datasets.utils import check_integrity, download_url

    archive = raw_dir / CIFAR10_ARCHIVE
    if not archive.exists():
        raw_dir.mkdir(parents=True, exist_ok=True)
        try:
            download_url(CIFAR10_URL, str(raw_dir), CIFAR10_ARCHIVE, CIFAR10_MD5)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            archive.unlink(missing_ok=True)
            raise DataSourceError(_offline_message(archive, type(exc).__name__)) from None
    if not check_integrity(str(archive), CIFAR10_MD5):
        raise DataSourceError(
            f"{archive}: checksum mismatch (not the official {CIFAR10_ARCHIVE}, or truncated); "
            "delete it and re-run 'dvc repro prepare' to download it again"
        )
    return archive


def read_cifar10_archive(archive: Path) -> dict[str, Split]:
    """Read both splits from the official python archive without extracting it."""
    batches: dict[str, list[dict]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        meta = None
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if name not in ("batches.meta", "test_batch") and not name.startswith("data_batch"):
                continue
            # The archive's own format is pickle; its md5 was verified above.
            entry = pickle.load(tar.extractfile(member), encoding="latin1")
            if name == "batches.meta":
                meta = entry
            else:
                batches["test" if name == "test_batch" else "train"].append(entry)
    if meta is None or len(batches["train"]) != 5 or len(batches["test"]) != 1:
        raise DataSourceError(f"{archive}: not the CIFAR-10 python archive (batches missing)")
    classes = list(meta["label_names"])
    out = {}
    for split, entries in batches.items():
        data = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(e["labels"]) for e in entries]).astype(np.int64)
        out[split] = Split(np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels, classes)
    return out


# --------------------------------------------------------------------------- ImageFolder source


def list_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Files and labels of ``root/{train,test}/<class>/*``, checked for a usable layout."""
    if not root.is_dir():
        raise DataSourceError(
            f"data.source: {root} does not exist; set data.source to 'cifar10' or to a folder "
            "holding train/<class>/* and test/<class>/*"
        )
    class_sets = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            raise DataSourceError(
                f"data.source: {root} has no {split}/ folder; expected {root}/train/<class>/* "
                f"and {root}/test/<class>/*"
            )
        class_sets[split] = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not class_sets[split]:
            raise DataSourceError(f"{d}: no class folders; expected {d}/<class>/<image>")
    if class_sets["train"] != class_sets["test"]:
        only_train = sorted(set(class_sets["train"]) - set(class_sets["test"]))
        only_test = sorted(set(class_sets["test"]) - set(class_sets["train"]))
        raise DataSourceError(
            f"data.source: {root}: train/ and test/ have different classes "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'}); "
            "make the class folders match"
        )
    classes = class_sets["train"]
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, cls in enumerate(classes):
            d = root / split / cls
            images = sorted(
                p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not images:
                raise DataSourceError(
                    f"{d}: empty class folder (no image files); add images or remove the folder "
                    f"from both train/ and test/"
                )
            files[split].extend((p, label) for p in images)
    return classes, files


def decode_image(path: Path) -> np.ndarray:
    """Decode any PIL-readable image to 32x32x3 uint8 RGB; name the file when it fails."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataSourceError(
            f"{path}: cannot decode image ({reason}); fix or remove the file and re-run "
            "'dvc repro prepare'"
        ) from None


def _decode_many(paths: Sequence[Path]) -> np.ndarray:
    return np.stack([decode_image(p) for p in paths])


def _map_chunks(fn, items: Sequence, workers: int) -> list:
    """fn over chunks of items, in order; a process pool for large inputs."""
    if len(items) < _POOL_MIN_IMAGES or workers <= 1:
        return [fn(items)]
    size = max(256, len(items) // (workers * 8))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, chunks))


def read_image_folder(root: Path, workers: int) -> dict[str, Split]:
    classes, listed = list_image_folder(root)
    out = {}
    for split, items in listed.items():
        images = np.concatenate(_map_chunks(_decode_many, [p for p, _ in items], workers))
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        out[split] = Split(images, labels, classes)
    return out


# --------------------------------------------------------------------------- writing


def keep_per_class(split: Split, max_per_class: int | None) -> Split:
    """The first ``max_per_class`` images of each class, in source order."""
    if max_per_class is None:
        return split
    keep = np.zeros(len(split.labels), dtype=bool)
    for label in range(len(split.classes)):
        keep[np.flatnonzero(split.labels == label)[:max_per_class]] = True
    return Split(split.images[keep], split.labels[keep], split.classes)


def _encode_pngs(jobs: Sequence[tuple[np.ndarray, str]]) -> None:
    for pixels, dst in jobs:
        # compress_level=1: 5x faster than the default and only ~10% larger for 32x32 images.
        Image.fromarray(pixels).save(dst, format="PNG", compress_level=1)


def write_png_tree(split: Split, out_dir: Path, workers: int) -> None:
    """``out_dir/<class>/<nnnnn>.png``, numbered per class in order (atomically swapped in)."""
    with atomic_dir(out_dir) as tmp:
        jobs = []
        counters = [0] * len(split.classes)
        for cls in split.classes:
            (tmp / cls).mkdir()
        for pixels, label in zip(split.images, split.labels, strict=True):
            name = f"{counters[label]:05d}.png"
            counters[label] += 1
            jobs.append((pixels, str(tmp / split.classes[label] / name)))
        _map_chunks(_encode_pngs, jobs, workers)


def write_packed(split: Split, path: Path) -> None:
    """One uint8 N x 3 x 32 x 32 tensor file (+ labels, classes) for the fast training path."""
    import torch

    payload = {
        "images": torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2))),
        "labels": torch.from_numpy(split.labels),
        "classes": list(split.classes),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def prepare(
    source: str, *, max_per_class: int | None, out_dir: Path = Path("data"), workers: int = 2
) -> dict:
    """Read the source, write the PNG tree and packed tensors; return the report."""
    if source == "cifar10":
        splits = read_cifar10_archive(fetch_cifar10_archive(out_dir / "raw"))
    else:
        splits = read_image_folder(Path(source).expanduser(), workers)
    splits["train"] = keep_per_class(splits["train"], max_per_class)
    report = {"source": source, "classes": splits["train"].classes}
    for name, split in splits.items():
        write_png_tree(split, out_dir / name, workers)
        write_packed(split, out_dir / "packed" / f"{name}.pt")
        counts = np.bincount(split.labels, minlength=len(split.classes))
        report[name] = {"images": len(split.labels), "per_class": counts.tolist()}
    write_json(out_dir / "prepare_report.json", report)
    return report


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
