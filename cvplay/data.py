"""The prepared data as the stages read it: the train/val split, the packed uint8 tensors,
normalisation on the device and batches by index (shared by training, evaluation and the
features stage). Training augmentation and the two image loaders are in ``cvplay.loaders``,
so that changing them does not invalidate the features stage's cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cvplay.errors import CvplayError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PreparedDataError(CvplayError):
    """Prepared data under data/ is missing or stale."""


def resolve_val_count(n: int, val_split: int | float) -> int:
    count = round(n * val_split) if isinstance(val_split, float) else val_split
    if not 1 <= count < n:
        raise CvplayError(
            f"params.yaml: data.val_split: {val_split!r} gives {count} validation images "
            f"out of {n} training images; use a count between 1 and {n - 1} or a fraction"
        )
    return count


def split_indices(n: int, val_split: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/val indices from a fixed ``torch.Generator`` seeded with ``seed``."""
    n_val = resolve_val_count(n, val_split)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@dataclass
class Packed:
    images: torch.Tensor  # N x 3 x H x W uint8
    labels: torch.Tensor  # N int64
    classes: list[str]


def load_packed(path: str | Path) -> Packed:
    path = Path(path)
    if not path.exists():
        raise PreparedDataError(f"{path}: not found; run 'dvc repro prepare' first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Packed(payload["images"], payload["labels"], list(payload["classes"]))
    except Exception as exc:  # weights_only refuses pickled code; or not a packed file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PreparedDataError(
            f"{path}: not a packed data file or unsafe to load ({first}); "
            "run 'dvc repro prepare' to rebuild it"
        ) from None


class Normalize:
    """uint8 N x 3 x H x W on the device -> normalised float32 in the requested memory format.

    Measured on the 2-core CPU (128 images): copy into a fresh float tensor then scale and
    shift in place, 0.9 ms; ``addcmul`` on the strided uint8 view, 3.8 ms.
    """

    def __init__(self, device: torch.device, memory_format=torch.contiguous_format):
        mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(
            x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format
        )
        return out.copy_(x).mul_(self.scale).add_(self.shift)


def shard(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous part of a batch (the whole batch when not distributed)."""
    return t if world == 1 else t.tensor_split(world, dim=dim)[rank]


class DeviceBatches:
    """Batches of a device-resident dataset by index, shuffled per epoch when training.

    Every rank draws the same permutation and the same augmentation for the global batch
    (``batch_size``) and keeps its own shard, so N processes see exactly what one would.
    Subclasses turn a global batch of indices into this rank's (input, labels).
    """

    def __init__(self, labels, indices, *, batch_size, device, train, seed, rank=0, world=1):
        self.labels = labels.to(device)
        self.indices = indices.to(device)
        self.batch_size = batch_size
        self.train = train
        self.rank, self.world = rank, world
        self.drop_last = train and len(indices) > batch_size  # no size-1 BatchNorm batches
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        n, b = len(self.indices), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def shard(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return shard(t, self.rank, self.world, dim)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.train:
            perm = torch.randperm(len(order), device=order.device, generator=self.generator)
            order = order[perm]
        for i in range(len(self)):
            yield self.batch(order[i * self.batch_size : (i + 1) * self.batch_size])


def classes_of(data_dir: Path) -> list[str]:
    return load_packed(data_dir / "packed" / "train.pt").classes
