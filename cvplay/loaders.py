"""Batches of images for training and evaluation, and the training augmentation.

Two loaders yield the same thing, batches of normalised float images and int64 labels on
the training device:

- ``packed`` (default): the split's uint8 tensor (``data/packed/<split>.pt``) is loaded
  onto the device once; every batch is cropped, flipped and normalised there by tensor
  indexing, so no per-sample Python runs and nothing is decoded after the first load.
- ``folder``: torchvision ``ImageFolder`` over the PNG tree with per-sample transforms in
  DataLoader workers, as the notebook did (any user dataset, any image size).

Both see the images in the same order (class, then file name), so
``cvplay.data.split_indices`` gives the same train/val split for either.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from cvplay.config import CROP_AUGMENTS
from cvplay.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DeviceBatches,
    Normalize,
    Packed,
    PreparedDataError,
)

PAD = 4  # RandomCrop(32, padding=4): the default train.crop_padding
# crop_altflip's per-image first flips come from a generator seeded with seed + this, apart
# from the loader's generator (whose state a resumed run restores).
ALTFLIP_SEED_OFFSET = 1

# How the border added before a random crop is filled (train.crop_pad_mode): with zeros (black,
# RandomCrop's default) or by reflecting the image at its edge (airbench, Page's ResNet-9).
PAD_MODES = {"zeros": "constant", "reflect": "reflect"}  # -> torch/torchvision padding mode


class Cutout(nn.Module):
    """Cutout for the folder loader's per-sample transforms: a ``side`` x ``side`` square at
    a uniform position wholly inside the normalised C x H x W image set to 0 (the dataset
    mean). Positions come from torch's global RNG, which DataLoader seeds per worker."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - self.side + 1, ()))
        left = int(torch.randint(0, w - self.side + 1, ()))
        x = x.clone()
        x[..., top : top + self.side, left : left + self.side] = 0.0
        return x


def train_transform(
    augment: str = "crop_flip", pad: int = PAD, pad_mode: str = "zeros", cutout: int = 0
) -> transforms.Compose:
    """``augment``: "crop_flip" (RandomCrop(32, padding=pad) + flip), "flip" or "none";
    ``pad_mode``: a key of ``PAD_MODES``; ``cutout``: the side of Cutout's square (0 = off).
    (The per-sample transforms know no epoch, so they have no "crop_altflip"; config
    validation keeps it to the packed loader.)"""
    steps = []
    if augment == "crop_flip":
        steps.append(transforms.RandomCrop(32, padding=pad, padding_mode=PAD_MODES[pad_mode]))
    if augment in ("crop_flip", "flip"):
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if cutout:
        steps.append(Cutout(cutout))
    return transforms.Compose(steps)


def eval_transform() -> transforms.Compose:
    return transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )


def pack_pixels(images: torch.Tensor, pad: int = 0, pad_mode: str = "zeros") -> torch.Tensor:
    """uint8 N x 3 x H x W -> int32 N x (H+2pad) x (W+2pad): one RGB0 pixel per int32, the
    border filled as ``pad_mode`` says (a key of ``PAD_MODES``).

    Cropping then moves one 4-byte word per pixel instead of three separate bytes, with
    one index per pixel instead of one per byte (3x fewer int64 indices to compute).
    """
    if pad and pad_mode != "zeros":
        images = nn.functional.pad(images, (pad,) * 4, mode=PAD_MODES[pad_mode])
        pad = 0
    hwc = nn.functional.pad(images.permute(0, 2, 3, 1), (0, 1, pad, pad, pad, pad))
    return hwc.contiguous().view(torch.int32).squeeze(-1)


def unpack_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """int32 B x H x W -> uint8 B x 3 x H x W (a channels_last view, no copy)."""
    b, h, w = pixels.shape
    return pixels.view(torch.uint8).view(b, h, w, 4)[..., :3].permute(0, 3, 1, 2)


def crop_flip_params(
    n: int, span: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (2 x n, uniform over span x span) and flips (n, p=0.5)."""
    dev = generator.device
    offsets = torch.randint(0, span, (2, n), device=dev, generator=generator)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    return offsets, flip


def crop_flip(
    pixels: torch.Tensor,
    idx: torch.Tensor,
    offsets: torch.Tensor,
    flip: torch.Tensor,
    size: int = 32,
) -> torch.Tensor:
    """Crops of ``size`` from padded packed images ``pixels[idx]`` (see ``pack_pixels``),
    at ``offsets``, mirrored where ``flip``: RandomCrop(padding) + RandomHorizontalFlip.

    One gather with the flip folded into the column index; returns uint8 B x 3 x size x size.
    (``index_select`` on a flat index: 0.08 ms for 128 images on the 2-core CPU, against
    0.25 ms for advanced indexing with the same 3-d index.)
    """
    _, h, w = pixels.shape
    ar = torch.arange(size, device=pixels.device)
    rows = offsets[0, :, None] + ar  # b x size
    cols = offsets[1, :, None] + torch.where(flip[:, None], size - 1 - ar, ar)
    flat = idx[:, None, None] * (h * w) + rows[:, :, None] * w + cols[:, None, :]
    out = pixels.view(-1).index_select(0, flat.view(-1)).view(flat.shape)
    return unpack_pixels(out)


def augment_params(
    n: int, crop: bool, flip: bool, generator: torch.Generator, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (2 x n, into images padded by ``pad``; zeros without ``crop``) and flips
    (n) of one batch."""
    if crop:
        return crop_flip_params(n, 2 * pad + 1, generator)
    dev = generator.device
    offsets = torch.zeros(2, n, dtype=torch.long, device=dev)
    if flip:
        return offsets, torch.rand(n, device=dev, generator=generator) < 0.5
    return offsets, torch.zeros(n, dtype=torch.bool, device=dev)


def cutout_mask(n: int, size: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout's squares for a batch of n size x size images: bool n x 1 x size x size, True
    inside a side x side square at a uniform position wholly inside each image."""
    dev = generator.device
    corners = torch.randint(0, size - side + 1, (2, n, 1), device=dev, generator=generator)
    ar = torch.arange(size, device=dev)
    rows = (ar >= corners[0]) & (ar < corners[0] + side)  # n x size
    cols = (ar >= corners[1]) & (ar < corners[1] + side)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def augmented_samples(
    images: torch.Tensor,
    augment: str,
    seed: int,
    pad: int = PAD,
    pad_mode: str = "zeros",
    cutout: int = 0,
) -> torch.Tensor:
    """``images`` (uint8 N x 3 x H x W) augmented as ``PackedLoader`` does for training,
    from a generator of their own (the training run's RNGs are not touched). An image's
    alternating flip (crop_altflip) is a seeded coin in its first epoch, so it is drawn as
    crop_flip's is. Cutout's squares show the dataset mean, the colour 0 is after
    normalisation."""
    crop, flips = augment in CROP_AUGMENTS, augment in (*CROP_AUGMENTS, "flip")
    generator = torch.Generator().manual_seed(seed)
    offsets, flip = augment_params(len(images), crop, flips, generator, pad)
    pixels = pack_pixels(images, pad if crop else 0, pad_mode)
    size = images.shape[-1]
    out = crop_flip(pixels, torch.arange(len(images)), offsets, flip, size)
    if cutout:
        mean = torch.tensor(CIFAR10_MEAN).mul(255).round().to(torch.uint8).view(3, 1, 1)
        out = torch.where(cutout_mask(len(images), size, cutout, generator), mean, out)
    return out


class PackedLoader(DeviceBatches):
    """Batches from device-resident packed pixels; augmentation by indexing on the device.

    ``augment="crop_altflip"`` is airbench's alternating flip: every image is mirrored in
    every other epoch, starting from a seeded coin per image (``first_flip``), so that any
    two consecutive epochs show both of its sides. The epoch comes from ``set_epoch`` (as
    with ``DistributedSampler``), which the training loop calls before each epoch.
    """

    def __init__(
        self,
        packed: Packed,
        indices: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        train: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
        augment: str = "crop_flip",
        crop_padding: int = PAD,
        crop_pad_mode: str = "zeros",
        cutout: int = 0,
    ):
        super().__init__(
            packed.labels,
            indices,
            batch_size=batch_size,
            device=device,
            train=train,
            seed=seed,
            rank=rank,
            world=world,
        )
        self.crop = train and augment in CROP_AUGMENTS
        self.flip = train and augment in ("crop_flip", "flip")
        self.epoch = 1
        self.first_flip = None  # per image (indexed like packed.images), crop_altflip only
        if train and augment == "crop_altflip":
            coins = torch.Generator().manual_seed(seed + ALTFLIP_SEED_OFFSET)
            first = torch.rand(len(packed.images), generator=coins) < 0.5
            self.first_flip = first.to(device)
        # Padded once up front (as RandomCrop's padding), not per batch.
        self.pad = crop_padding
        pad = self.pad if self.crop else 0
        self.pixels = pack_pixels(packed.images, pad, crop_pad_mode).to(device)
        self.size = packed.images.shape[-1]
        self.cutout = cutout if train else 0
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.normalize = Normalize(device, fmt)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets, flip = augment_params(len(idx), self.crop, self.flip, self.generator, self.pad)
        # Drawn after the crops (with cutout off the RNG stream is what it was without it).
        mask = None
        if self.cutout:
            mask = self.shard(cutout_mask(len(idx), self.size, self.cutout, self.generator))
        if self.first_flip is not None:  # the first flip in odd epochs, the other in even
            flip = self.first_flip[idx] != (self.epoch % 2 == 0)
        idx, offsets, flip = self.shard(idx), self.shard(offsets, 1), self.shard(flip)
        x = self.normalize(crop_flip(self.pixels, idx, offsets, flip, self.size))
        if mask is not None:  # 0 after normalisation: the dataset mean
            x.masked_fill_(mask, 0.0)
        return x, self.labels[idx]


class DeviceLoader:
    """Wrap a DataLoader so batches arrive on the device (non-blocking from pinned memory)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self) -> torch.Generator | None:
        """Where each epoch's shuffle and the workers' augmentation seeds come from."""
        return self.loader.generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _image_folder(root: Path, transform) -> datasets.ImageFolder:
    if not root.is_dir():
        raise PreparedDataError(f"{root}: not found; run 'dvc repro prepare' first")
    return datasets.ImageFolder(str(root), transform=transform)


def folder_loader(
    root: Path,
    indices: torch.Tensor | None,
    *,
    batch_size: int,
    device: torch.device,
    train: bool,
    seed: int,
    num_workers: int,
    augment: str = "crop_flip",
    crop_padding: int = PAD,
    crop_pad_mode: str = "zeros",
    cutout: int = 0,
) -> DeviceLoader:
    augmentation = train_transform(augment, crop_padding, crop_pad_mode, cutout)
    transform = augmentation if train else eval_transform()
    dataset = _image_folder(root, transform)
    subset = Subset(dataset, indices.tolist()) if indices is not None else dataset
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(subset) > batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Workers start afresh each epoch and seed their augmentation from this generator, so
        # the generator's state at an epoch boundary decides the rest of the run (resume is
        # bit-exact); persistent workers would carry RNG state the resume file cannot hold.
        persistent_workers=False,
        # Shuffling and each worker's augmentation seed derive from this generator.
        generator=torch.Generator().manual_seed(seed),
    )
    return DeviceLoader(loader, device)
