"""The pictures a run leaves behind: augmented samples, mistakes, per-class accuracy."""

import csv

import torch
from PIL import Image

from cvplay.evaluate import plot_mistakes
from cvplay.loaders import PAD, augmented_samples
from cvplay.plots import write_per_class


def _images(n: int = 16, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_augmented_samples_are_crops_and_flips_of_the_originals():
    images = _images()
    out = augmented_samples(images, "crop_flip", seed=1)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    changed = 0
    for img, aug in zip(padded, out, strict=True):
        found = False
        for dy in range(2 * PAD + 1):
            for dx in range(2 * PAD + 1):
                crop = img[:, dy : dy + 32, dx : dx + 32]
                if torch.equal(crop, aug) or torch.equal(crop.flip(2), aug):
                    found = True
        assert found
        changed += not torch.equal(aug, img[:, PAD:-PAD, PAD:-PAD])
    assert changed > 8  # most samples moved or flipped
    # its own generator: same seed, same pictures; the global RNG is untouched
    state = torch.get_rng_state()
    assert torch.equal(augmented_samples(images, "crop_flip", seed=1), out)
    assert torch.equal(torch.get_rng_state(), state)


def test_augment_none_shows_the_images_as_they_are():
    images = _images()
    assert torch.equal(augmented_samples(images, "none", seed=1), images)
    flipped = augmented_samples(images, "flip", seed=1)
    for img, aug in zip(images, flipped, strict=True):
        assert torch.equal(aug, img) or torch.equal(aug, img.flip(2))


def test_augmented_samples_show_cutout_squares_in_the_mean_colour():
    from cvplay.data import CIFAR10_MEAN

    images = _images()
    plain = augmented_samples(images, "crop_flip", seed=2)
    out = augmented_samples(images, "crop_flip", seed=2, cutout=8)
    mean = torch.tensor(CIFAR10_MEAN).mul(255).round().to(torch.uint8)
    differ = (out != plain).any(1)  # where the square changed a pixel
    for img, square in zip(out, (out == mean.view(3, 1, 1)).all(1), strict=True):
        assert int(square.sum()) >= 64  # the 8 x 8 square (noise may match the mean by chance)
        assert torch.equal(img[:, square].T, mean.expand(int(square.sum()), 3))
    assert not differ[~(out == mean.view(3, 1, 1)).all(1)].any()  # the rest is untouched


def test_plot_mistakes_shows_the_most_confident_wrong_predictions(tmp_path):
    labels = torch.tensor([0, 1, 2, 0, 1])
    logits = torch.tensor(
        [
            [5.0, 0, 0],  # right
            [4.0, 0, 0],  # wrong, confident
            [0, 1.0, 0.9],  # wrong, unsure
            [0, 9.0, 0],  # wrong, most confident
            [0, 3.0, 0],  # right
        ]
    )
    path = tmp_path / "mistakes.png"
    worst = plot_mistakes(logits, labels, _images(5), ["a", "b", "c"], path, n=2)
    assert worst.tolist() == [3, 1]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200


def test_per_class_csv_is_one_row_per_class(tmp_path):
    path = tmp_path / "per_class.csv"
    write_per_class(path, ["cat", "dog", "frog"], [0.5, 0.25, 1.0])
    rows = list(csv.DictReader(path.open()))
    assert rows == [
        {"class": "cat", "accuracy": "0.5"},
        {"class": "dog", "accuracy": "0.25"},
        {"class": "frog", "accuracy": "1.0"},
    ]
