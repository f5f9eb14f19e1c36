import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import functional as TF

from cvplay import prepare as prep
from cvplay.data import Normalize, Packed, load_packed, split_indices
from cvplay.errors import CvplayError
from cvplay.loaders import (
    PAD_MODES,
    PackedLoader,
    augment_params,
    crop_flip,
    eval_transform,
    folder_loader,
    pack_pixels,
    train_transform,
    unpack_pixels,
)
from tests.conftest import CLASSES, make_image_folder


@pytest.fixture(scope="module")
def prepared(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prep.prepare(str(tiny_folder), max_per_class=None, out_dir=out, workers=1)
    return out


def test_prepare_writes_png_tree_packed_tensors_and_report(prepared):
    train = datasets.ImageFolder(str(prepared / "train"))
    assert train.classes == CLASSES
    # 12 per class + the grayscale and RGBA extras; notes.txt ignored
    assert len(train) == 12 * 10 + 2
    for path, _ in train.samples[:5] + train.samples[-5:]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    packed = load_packed(prepared / "packed" / "train.pt")
    assert packed.images.dtype == torch.uint8 and packed.images.shape == (122, 3, 32, 32)
    assert packed.classes == CLASSES
    # The packed tensor holds exactly the PNG tree's pixels, in ImageFolder's order.
    for i in (0, 37, 121):
        png = np.asarray(Image.open(train.samples[i][0]))
        assert np.array_equal(packed.images[i].permute(1, 2, 0).numpy(), png)
        assert packed.labels[i].item() == train.samples[i][1]
    test = load_packed(prepared / "packed" / "test.pt")
    assert test.images.shape == (41, 3, 32, 32)  # 4 per class + the 40x40 image, resized
    report = (prepared / "prepare_report.json").read_text()
    assert '"images": 122' in report


def test_max_per_class_keeps_the_first_n_train_images_only(tiny_folder, tmp_path):
    report = prep.prepare(str(tiny_folder), max_per_class=3, out_dir=tmp_path, workers=1)
    assert report["train"]["per_class"] == [3] * 10
    assert report["test"]["images"] == 41
    kept = sorted(p.name for p in (tmp_path / "train" / "class0").iterdir())
    assert kept == ["00000.png", "00001.png", "00002.png"]


def test_pool_and_inline_decoding_agree(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "_POOL_MIN_IMAGES", 1)
    pooled = prep.read_image_folder(tiny_folder, workers=2)
    monkeypatch.setattr(prep, "_POOL_MIN_IMAGES", 10**9)
    inline = prep.read_image_folder(tiny_folder, workers=1)
    assert np.array_equal(pooled["train"].images, inline["train"].images)


def _fails_cleanly(source: Path, out: Path, message: str) -> None:
    with pytest.raises(CvplayError) as err:
        prep.prepare(str(source), max_per_class=None, out_dir=out, workers=1)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    # Nothing half-written: no split folder, no packed file, no report.
    assert not (out / "train").exists() and not (out / "packed").exists()
    assert not (out / "prepare_report.json").exists()


def test_missing_source(tmp_path):
    _fails_cleanly(tmp_path / "nowhere", tmp_path / "data", "nowhere does not exist")


def test_source_without_test_folder(tmp_path):
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    _fails_cleanly(tmp_path / "src", tmp_path / "data", "has no test/ folder")


def test_empty_class_folder(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=1, test_per_class=1)
    for f in (src / "test" / "class3").iterdir():
        f.unlink()
    _fails_cleanly(src, tmp_path / "data", "class3: empty class folder")


def test_different_class_sets(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=1, test_per_class=1)
    (src / "test" / "class9").rename(src / "test" / "zebra")
    _fails_cleanly(src, tmp_path / "data", "only in train: ['class9']; only in test: ['zebra']")


def test_undecodable_image_is_named(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=2, test_per_class=1)
    bad = src / "train" / "class4" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _fails_cleanly(src, tmp_path / "data", f"{src}: 1 bad image: train/class4/broken.png (")


def test_truncated_jpeg_is_named(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=2, test_per_class=1)
    good = src / "train" / "class5" / "000.jpg"
    good.write_bytes(good.read_bytes()[:200])
    _fails_cleanly(src, tmp_path / "data", "train/class5/000.jpg (truncated file)")


def test_offline_cifar10_says_where_to_put_the_archive(tmp_path, monkeypatch):
    # A real download attempt against a port nothing listens on: the offline failure path.
    monkeypatch.setattr(prep, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(CvplayError) as err:
        prep.prepare("cifar10", max_per_class=None, out_dir=tmp_path / "data", workers=1)
    msg = str(err.value)
    assert "put cifar-10-python.tar.gz" in msg and str(tmp_path / "data" / "raw") in msg
    assert "data.source=../shared/data/cifar10-jpg" in msg
    assert not (tmp_path / "data" / "raw" / "cifar-10-python.tar.gz").exists()


def test_corrupt_archive_is_refused(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(CvplayError, match="checksum mismatch"):
        prep.prepare("cifar10", max_per_class=None, out_dir=tmp_path / "data", workers=1)


def test_reads_the_official_archive_layout(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "cifar.tar.gz"
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]

    def add(tar, name, obj):
        data = pickle.dumps(obj)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "batches.meta", {"label_names": names})
        for i in range(1, 6):
            add(
                tar,
                f"data_batch_{i}",
                {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i, 0, 1, 2]},
            )
        add(
            tar,
            "test_batch",
            {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [9, 8, 7]},
        )
    splits = prep.read_cifar10_archive(archive)
    assert splits["train"].images.shape == (20, 32, 32, 3)
    assert splits["train"].labels[:4].tolist() == [1, 0, 1, 2]
    assert splits["test"].classes == names and splits["test"].labels.tolist() == [9, 8, 7]


def test_split_is_deterministic_disjoint_and_sized():
    tr1, va1 = split_indices(50000, 5000, seed=42)
    tr2, va2 = split_indices(50000, 5000, seed=42)
    tr3, _ = split_indices(50000, 5000, seed=43)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert not torch.equal(tr1, tr3)
    assert len(tr1) == 45000 and len(va1) == 5000
    assert len(set(tr1.tolist()) | set(va1.tolist())) == 50000
    assert len(split_indices(1000, 0.1, seed=0)[1]) == 100


def test_val_split_larger_than_train_set_is_an_error():
    with pytest.raises(
        CvplayError, match=r"data\.val_split: 5000 gives 5000 validation images out of 500"
    ):
        split_indices(500, 5000, seed=0)


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ours = Normalize(torch.device("cpu"))(x)
    theirs = torch.stack([eval_transform()(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in x])
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("pad,mode", [(4, "zeros"), (2, "zeros"), (2, "reflect")])
def test_crop_flip_produces_valid_crops_of_the_padded_image(pad, mode):
    torch.manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=PAD_MODES[mode])
    offsets, flip = augment_params(64, True, True, torch.Generator().manual_seed(1), pad)
    assert set(offsets.unique().tolist()) == set(range(2 * pad + 1))
    out = crop_flip(pack_pixels(x, pad, mode), torch.arange(64), offsets, flip)
    assert out.dtype == torch.uint8 and out.shape == (64, 3, 32, 32)
    span = range(2 * pad + 1)
    for i in range(64):
        candidates = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in span for dx in span]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


@pytest.mark.parametrize("pad", [4, 2])
def test_crop_flip_has_torchvision_randomcrop_flip_distribution(pad):
    # Statistics of where a marked pixel lands: offsets uniform over (2 pad + 1)^2, flips
    # ~ 1/2, compared with torchvision's RandomCrop(32, padding=pad) + RandomHorizontalFlip.
    n = 4000
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[0, 0, 16, 10] = 255
    offsets, flip = augment_params(n, True, True, torch.Generator().manual_seed(0), pad)
    ours = crop_flip(pack_pixels(img, pad), torch.zeros(n, dtype=torch.long), offsets, flip)
    torch.manual_seed(0)
    tf = train_transform("crop_flip", pad).transforms[:2]
    assert tf[0].padding == pad
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy())
    theirs = torch.stack(
        [torch.from_numpy(np.array(tf[1](tf[0](pil)))).permute(2, 0, 1) for _ in range(n)]
    )

    def positions(batch):
        hit = batch[:, 0] == 255
        visible = hit.flatten(1).any(1)
        rows = hit.any(2).float().argmax(1)[visible]
        cols = hit.any(1).float().argmax(1)[visible]
        return visible.float().mean(), rows.float(), cols.float()

    v1, r1, c1 = positions(ours)
    v2, r2, c2 = positions(theirs)
    assert abs(v1 - v2) < 0.03
    assert abs(r1.mean() - r2.mean()) < 0.2 and abs(r1.std() - r2.std()) < 0.2
    # Flip sends column 10 (+offset) to the right half: both halves equally likely.
    assert abs((c1 > 15.5).float().mean() - (c2 > 15.5).float().mean()) < 0.04
    assert abs(c1.std() - c2.std()) < 0.5


def test_packed_and_folder_loaders_give_the_same_val_batches(prepared):
    packed = load_packed(prepared / "packed" / "train.pt")
    _, val_idx = split_indices(len(packed.labels), 20, seed=0)
    cpu = torch.device("cpu")
    a = PackedLoader(packed, val_idx, batch_size=8, device=cpu, train=False, seed=0)
    b = folder_loader(
        prepared / "train", val_idx, batch_size=8, device=cpu, train=False, seed=0, num_workers=0
    )
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert torch.allclose(xa, xb, atol=1e-5)


def test_pack_pixels_round_trips():
    x = torch.randint(0, 256, (5, 3, 8, 6), dtype=torch.uint8)
    packed = pack_pixels(x)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8, 6)
    assert torch.equal(unpack_pixels(packed), x)
    padded = unpack_pixels(pack_pixels(x, 2))
    assert torch.equal(padded, torch.nn.functional.pad(x, (2, 2, 2, 2)))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_packed_padding_is_torchvisions_randomcrop_padding(mode):
    # The folder loader's RandomCrop pads the PIL image; the packed loader pads once up front.
    # Both must fill the border with the same pixels.
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    crop = train_transform("crop_flip", 3, mode).transforms[0]
    assert crop.padding_mode == PAD_MODES[mode]
    ours = unpack_pixels(pack_pixels(x, 3, mode))
    for i in range(3):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        theirs = np.array(TF.pad(pil, crop.padding, padding_mode=crop.padding_mode))
        assert torch.equal(ours[i], torch.from_numpy(theirs).permute(2, 0, 1))
    if mode == "reflect":  # no black border: row 0 of the padded image is row 3 of the image
        assert torch.equal(ours[:, :, 0, 3:-3], x[:, :, 3])


@pytest.mark.parametrize("cutout", [0, 6])
def test_sharded_batches_add_up_to_the_global_batch(prepared, cutout):
    # Two ranks with the same seed see the two halves of what one process sees.
    packed = load_packed(prepared / "packed" / "train.pt")
    idx = torch.arange(len(packed.labels))
    kw = dict(batch_size=16, device=torch.device("cpu"), train=True, seed=7, cutout=cutout)
    whole = PackedLoader(packed, idx, **kw)
    halves = [PackedLoader(packed, idx, rank=r, world=2, **kw) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_packed_train_loader_is_seeded_and_drops_the_last_partial_batch(prepared):
    packed = load_packed(prepared / "packed" / "train.pt")
    idx = torch.arange(len(packed.labels))
    cpu = torch.device("cpu")
    runs = []
    for _ in range(2):
        loader = PackedLoader(packed, idx, batch_size=16, device=cpu, train=True, seed=3)
        runs.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(runs[0]) == len(packed.labels) // 16
    assert all(x.shape == (16, 3, 32, 32) for x, _ in runs[0])
    for (x1, y1), (x2, y2) in zip(*runs, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("augment", ["flip", "none"])
def test_flip_only_and_no_augmentation(prepared, augment):
    packed = load_packed(prepared / "packed" / "train.pt")
    idx = torch.arange(len(packed.labels))
    cpu = torch.device("cpu")
    plain = PackedLoader(packed, idx, batch_size=len(idx), device=cpu, train=False, seed=0)
    ((reference, _),) = list(plain)
    loader = PackedLoader(
        packed, idx, batch_size=len(idx) // 2, device=cpu, train=True, seed=1, augment=augment
    )
    flips = 0
    for x, y in loader:
        for img, label in zip(x, y, strict=True):
            # every image is one of the originals, whole (no shift), maybe mirrored
            same = (reference == img).flatten(1).all(1)
            mirrored = (reference.flip(3) == img).flatten(1).all(1)
            assert (same | mirrored).any()
            assert (packed.labels[same | mirrored] == label).all()
            flips += int(mirrored.any() and not same.any())
    if augment == "none":
        assert flips == 0
    else:
        assert 0 < flips < len(idx)


def test_data_init_sample_is_a_seeded_draw_of_training_images_only():
    from cvplay.data import CIFAR10_MEAN, CIFAR10_STD, Packed
    from cvplay.train import DATA_INIT_IMAGES, data_init_sample

    n = 3 * DATA_INIT_IMAGES
    i = torch.arange(n)
    # image i: red = i % 256, green = i // 256, blue = 0 (labels sorted by class, as prepared)
    images = torch.stack([i % 256, i // 256, 0 * i], 1).to(torch.uint8).view(n, 3, 1, 1)
    packed = Packed(images.expand(n, 3, 4, 4).contiguous(), i * 10 // n, list("0123456789"))
    train_idx = torch.arange(0, n, 2)  # the even images
    sample = data_init_sample(packed, train_idx, seed=3)
    assert sample.shape == (DATA_INIT_IMAGES, 3, 4, 4) and sample.dtype == torch.float32
    assert torch.equal(sample, data_init_sample(packed, train_idx, seed=3))
    assert not torch.equal(sample, data_init_sample(packed, train_idx, seed=4))
    # normalised as the loaders normalise: (x / 255 - mean) / std
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    pixels = (sample[:, :, 0, 0] * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    red, green, blue = pixels.round().long().T
    assert (blue == 0).all()
    drawn = red + 256 * green
    assert len(set(drawn.tolist())) == DATA_INIT_IMAGES
    assert (drawn % 2 == 0).all()  # training images only
    # a draw across the classes, not the first images of the sorted set
    assert len(set((drawn * 10 // n).tolist())) == 10


def _mirrored(loader, reference):
    """{image index: shown mirrored?} over one epoch of ``loader`` (whole images, no crop)."""
    out = {}
    for x, _ in loader:
        for img in x:
            same = (reference == img).flatten(1).all(1)
            mirrored = (reference.flip(3) == img).flatten(1).all(1)
            assert int(same.sum() + mirrored.sum()) == 1  # exactly one image, one side
            out[int((same | mirrored).nonzero())] = bool(mirrored.any())
    return out


def test_alternating_flip_shows_each_image_mirrored_in_every_other_epoch():
    g = torch.Generator().manual_seed(0)  # noise images: none is its own mirror image
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    packed = Packed(images, torch.arange(40) % 4, list("abcd"))
    idx = torch.arange(5, 40)  # a training split: indices into the packed set
    cpu = torch.device("cpu")
    plain = PackedLoader(packed, idx, batch_size=len(idx), device=cpu, train=False, seed=0)
    ((reference, _),) = list(plain)

    def loader(seed):  # padding 0: the crops are the whole image, so only the flip varies
        kw = dict(batch_size=len(idx), device=cpu, train=True, seed=seed, crop_padding=0)
        return PackedLoader(packed, idx, augment="crop_altflip", **kw)

    a = loader(5)
    epochs = []
    for epoch in (1, 2, 3):
        a.set_epoch(epoch)
        epochs.append(_mirrored(a, reference))
    first, second, third = epochs
    assert first.keys() == set(range(len(idx)))
    assert 0 < sum(first.values()) < len(idx)  # a coin per image, not all or none
    assert all(second[i] != first[i] for i in first)  # each epoch shows the other side ...
    assert third == first  # ... and back
    b = loader(5)
    b.set_epoch(1)
    assert _mirrored(b, reference) == first  # seeded
    c = loader(6)
    c.set_epoch(1)
    assert _mirrored(c, reference) != first
    # the crops are crop_flip's: same seed, same offsets (only the flips differ)
    kw = dict(batch_size=len(idx), device=cpu, train=True, seed=5, crop_padding=2)
    alt = PackedLoader(packed, idx, augment="crop_altflip", **kw)
    rnd = PackedLoader(packed, idx, augment="crop_flip", **kw)
    alt.set_epoch(1)
    ((xa, ya),), ((xr, yr),) = list(alt), list(rnd)
    assert torch.equal(ya, yr)
    assert all(torch.equal(p, q) or torch.equal(p, q.flip(2)) for p, q in zip(xa, xr, strict=True))


def _square(zero: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the rectangle that holds all True pixels of ``zero``."""
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_cutout_sets_one_square_per_image_to_the_mean(channels_last):
    g = torch.Generator().manual_seed(0)  # noise: no uint8 pixel normalises to exactly 0
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=g)
    packed = Packed(images, torch.arange(40) % 4, list("abcd"))
    idx = torch.arange(40)
    cpu = torch.device("cpu")
    plain = PackedLoader(packed, idx, batch_size=40, device=cpu, train=False, seed=0)
    ((reference, _),) = list(plain)
    assert not (reference == 0).any()
    kw = dict(batch_size=40, device=cpu, seed=3, augment="none", channels_last=channels_last)
    ((x, y),) = list(PackedLoader(packed, idx, train=True, cutout=5, **kw))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)
    corners = set()
    for img, label in zip(x, y, strict=True):
        zero = (img == 0).all(0)
        assert int(zero.sum()) == 25 and (img == 0).any(0).equal(zero)  # all channels
        top, left, h, w = _square(zero)
        assert (h, w) == (5, 5) and 0 <= top <= 7 and 0 <= left <= 7  # wholly inside
        corners.add((top, left))
        # the rest of the image is one of the originals, untouched
        keep = ~zero
        match = (reference[:, :, keep] == img[:, keep]).flatten(1).all(1)
        assert int(match.sum()) == 1 and packed.labels[match].item() == label
    assert len(corners) > 10  # a place per image, not one for all
    # seeded, and for training only: a val loader ignores it
    ((x2, _),) = list(PackedLoader(packed, idx, train=True, cutout=5, **kw))
    assert torch.equal(x, x2)
    ((x3, _),) = list(PackedLoader(packed, idx, train=False, cutout=5, **kw))
    assert torch.equal(x3, reference)


def test_cutout_leaves_the_crops_and_flips_as_they_were(prepared):
    # A batch's squares are drawn after its crops and flips: with cutout the same seed gives
    # the batch the same crops and flips as without it (later batches' draws move on).
    packed = load_packed(prepared / "packed" / "train.pt")
    idx = torch.arange(len(packed.labels))
    n = len(idx)  # one batch
    kw = dict(batch_size=n, device=torch.device("cpu"), train=True, seed=4, crop_padding=3)
    without = list(PackedLoader(packed, idx, **kw))
    masked = 0
    for (a, ya), (b, yb) in zip(without, PackedLoader(packed, idx, cutout=8, **kw), strict=True):
        assert torch.equal(ya, yb)
        zero = (b == 0).all(1, keepdim=True)
        assert torch.equal(b, a.masked_fill(zero, 0.0))
        masked += int(zero.sum())
    assert len(without) == 1 and masked == n * 64  # an 8 x 8 square in every image


def test_folder_cutout_transform_sets_one_square_to_the_mean():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=g).numpy()
    image = Image.fromarray(pixels)
    reference = eval_transform()(image)
    torch.manual_seed(0)
    corners = set()
    for _ in range(20):
        out = train_transform("none", cutout=4)(image)
        zero = (out == 0).all(0)
        assert int(zero.sum()) == 16 and _square(zero)[2:] == (4, 4)
        assert torch.equal(out[:, ~zero], reference[:, ~zero])
        corners.add(_square(zero)[:2])
    assert len(corners) > 5
    assert torch.equal(train_transform("none")(image), reference)  # 0 = off
