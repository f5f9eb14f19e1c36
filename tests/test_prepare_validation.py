"""Prepare's source validation: bad files, ignored files, colour modes, sizes, duplicates."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFile

from cvplay import prepare as prep
from cvplay.config import ConfigError, parse_params
from cvplay.data import load_packed
from cvplay.errors import CvplayError
from tests.conftest import ROOT, make_image_folder, make_project, run, tiny_params

BAD = {  # path -> reason, as prepare reports them
    "train/a/cut.jpg": "truncated file",
    "train/a/empty.png": "empty file",
    "train/a/noise.jpg": "not an image PIL can read",
}
# Files that are not images (or hidden): ignored, counted per split.
IGNORED = {"train": 6, "test": 1}
CONVERTED = {
    "CMYK": 1,
    "I;16": 1,
    "L": 1,
    "LA": 1,
    "P": 1,
    "P+transparency": 1,
    "RGBA": 1,
}


def _noise(seed: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _gradient16() -> np.ndarray:
    """A 16-bit horizontal gradient over the full 0..65535 range (mostly > 255)."""
    return np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.fromarray(np.repeat(np.arange(4, dtype=np.uint8), 8)[None].repeat(32, 0), "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    if transparent:
        im.info["transparency"] = 0  # palette index 0 (red) is transparent
    return im


def make_messy_folder(root: Path) -> Path:
    """Two classes with one of every kind of bad, ignored, converted and duplicate file."""
    a, b = root / "train" / "a", root / "train" / "b"
    ta, tb = root / "test" / "a", root / "test" / "b"
    for d in (a, b, ta, tb):
        d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_noise(i)).save(a / f"rgb{i}.png")
        Image.fromarray(_noise(10 + i)).save(b / f"rgb{i}.png")
        Image.fromarray(_noise(20 + i)).save(tb / f"rgb{i}.png")
    Image.fromarray(_noise(30)).save(ta / "rgb0.png")
    # bad
    (a / "empty.png").write_bytes(b"")
    Image.fromarray(_noise(40)).save(a / "whole.jpg", quality=90)
    whole = (a / "whole.jpg").read_bytes()
    (a / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # past the headers, half the scan
    (a / "whole.jpg").unlink()
    (a / "noise.jpg").write_bytes(np.random.default_rng(41).bytes(600))
    # ignored: not images, hidden files (an AppleDouble file with an image name), a hidden
    # folder beside the classes
    (a / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (a / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (a / "readme.txt").write_text("not an image")
    (a / "._rgb0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (b / "notes.txt").write_text("")
    (tb / "Thumbs.db").write_bytes(b"")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    # modes
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(a / "gray.png")
    _palette_image(transparent=False).save(a / "pal.png")
    _palette_image(transparent=True).save(a / "paltrans.png")
    Image.fromarray(np.full((32, 32, 4), (200, 100, 50, 128), np.uint8)).save(a / "rgba.png")
    Image.fromarray(np.full((32, 32, 2), (200, 0), np.uint8)).save(b / "la.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(b / "cmyk.tif")
    Image.fromarray(_gradient16()).save(b / "gray16.png")
    # size
    Image.fromarray(_noise(50, (40, 48, 3))).save(b / "big.png")
    # duplicates: a train image repeated in train (other name) and in test (other format)
    shutil.copy(b / "rgb1.png", b / "rgb1_copy.png")
    Image.fromarray(_noise(0)).save(ta / "leak.bmp")
    return root


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("messy") / "src")


@pytest.fixture(scope="module")
def skipped(messy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skipped") / "data"
    prep.prepare(str(messy), max_per_class=None, out_dir=out, workers=1, on_bad_image="skip")
    return out


def test_error_names_every_bad_file_in_one_line_and_writes_nothing(messy, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(CvplayError) as err:
        prep.prepare(str(messy), max_per_class=None, out_dir=out, workers=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"data.source: {messy}: 3 bad images: ")
    for path, reason in BAD.items():
        assert f"{path} ({reason})" in msg, msg
    assert "data.on_bad_image" in msg and "'skip'" in msg
    # ignored files are not bad images
    assert "DS_Store" not in msg and "Thumbs" not in msg and "readme" not in msg
    assert not out.exists()


def test_error_leaves_previous_outputs_unchanged(messy, skipped, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(skipped, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CvplayError, match="3 bad images"):
        prep.prepare(str(messy), max_per_class=None, out_dir=out, workers=1)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_long_lists_of_bad_files_are_cut_short(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=1, test_per_class=1)
    for i in range(8):
        (src / "train" / "class1" / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(CvplayError) as err:
        prep.read_image_folder(src, workers=1)
    msg = str(err.value)
    assert "8 bad images" in msg and "; and 3 more;" in msg
    assert "bad4.png" in msg and "bad5.png" not in msg


def test_pool_workers_collect_every_bad_file(messy, monkeypatch):
    monkeypatch.setattr(prep, "_POOL_MIN_IMAGES", 1)
    with pytest.raises(CvplayError) as err:
        prep.read_image_folder(messy, workers=2)
    for path in BAD:
        assert path in str(err.value)


def test_skip_leaves_bad_files_out_and_reports_everything(skipped):
    report = json.loads((skipped / "prepare_report.json").read_text())
    assert report["source"].endswith("src") and report["classes"] == ["a", "b"]
    assert report["image_size"] == 32
    train, test = report["train"], report["test"]
    assert train["skipped"] == [{"path": p, "reason": r} for p, r in sorted(BAD.items())]
    assert test["skipped"] == []
    # a: 3 rgb + gray, pal, paltrans, rgba; b: 3 rgb + la, cmyk, gray16, big, rgb1_copy
    assert train["images"] == 15 and train["per_class"] == [7, 8]
    assert test["images"] == 5 and test["per_class"] == [2, 3]
    assert train["ignored_files"] == IGNORED["train"]
    assert test["ignored_files"] == IGNORED["test"]
    assert train["converted"] == CONVERTED
    assert test["converted"] == {}  # leak.bmp is plain RGB
    assert train["resized"] == 1 and test["resized"] == 0
    assert report["duplicates"] == {
        "test_in_train": 1,
        "within_train": 1,
        "examples": [
            ["test/a/leak.bmp", "train/a/rgb0.png"],
            ["train/b/rgb1.png", "train/b/rgb1_copy.png"],
        ],
    }
    packed = load_packed(skipped / "packed" / "train.pt")
    assert packed.images.shape == (15, 3, 32, 32)
    assert len(list((skipped / "train").rglob("*.png"))) == 15


def _output_pixels(out: Path, split: str, cls: str, names: list[str], name: str) -> np.ndarray:
    """The prepared PNG of source file ``name`` (outputs are numbered in sorted source order)."""
    index = sorted(names).index(name)
    return np.asarray(Image.open(out / split / cls / f"{index:05d}.png"))


def test_16bit_gray_keeps_its_gradient(skipped):
    names = ["rgb0.png", "rgb1.png", "rgb2.png", "la.png", "cmyk.tif", "gray16.png", "big.png"]
    pixels = _output_pixels(skipped, "train", "b", [*names, "rgb1_copy.png"], "gray16.png")
    row = pixels[16, :, 0].astype(int)
    # PIL's convert("RGB") would make all but the first column 255.
    assert (pixels == 255).mean() < 0.1
    assert row[0] == 0 and row[-1] == 255 and len(set(row.tolist())) == 32
    assert np.all(np.diff(row) > 0)
    expected = (_gradient16()[16].astype(int) >> 8).tolist()
    assert row.tolist() == expected
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # still gray


@pytest.mark.parametrize(
    ("make", "mode", "pixel"),
    [
        (lambda: Image.fromarray(np.full((32, 32), 90, np.uint8)), "L", (90, 90, 90)),
        (lambda: _palette_image(transparent=False), "P", (255, 0, 0)),
        # index 0 is transparent: black, like every transparent pixel
        (lambda: _palette_image(transparent=True), "P+transparency", (0, 0, 0)),
        (
            lambda: Image.fromarray(np.full((32, 32, 4), (200, 100, 50, 128), np.uint8)),
            "RGBA",
            (100, 50, 25),  # times alpha/255 (composited onto black)
        ),
        (lambda: Image.fromarray(np.full((32, 32, 2), (200, 0), np.uint8)), "LA", (0, 0, 0)),
        (lambda: Image.fromarray(np.full((32, 32, 2), (200, 255), np.uint8)), "LA", (200,) * 3),
        (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "CMYK", (255, 0, 0)),
        (lambda: Image.fromarray(np.full((32, 32), 40000, np.uint16)), "I;16", (156,) * 3),
        (lambda: Image.fromarray(np.full((32, 32), 40000, np.int32)), "I", (156,) * 3),
    ],
)
def test_every_mode_becomes_the_right_rgb(tmp_path, make, mode, pixel):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    make().save(path)
    pixels, source_mode, resized = prep.decode_image(path, 32)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert source_mode == mode and not resized
    assert tuple(pixels[0, 0].tolist()) == pixel


def test_truncated_files_fail_even_if_pil_was_set_lenient(messy, monkeypatch):
    # Some libraries set this process-wide; a half file must still be reported, not padded.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = prep._decode_chunk([messy / "train/a/cut.jpg", messy / "train/a/rgb0.png"], 32)
    assert result.reasons == ["truncated file", None] and len(result.images) == 1
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_image_size_sets_the_packed_shape_and_counts_resizes(messy, tmp_path):
    report = prep.prepare(
        str(messy),
        max_per_class=None,
        out_dir=tmp_path / "data",
        workers=1,
        image_size=16,
        on_bad_image="skip",
    )
    assert report["image_size"] == 16
    assert report["train"]["resized"] == 15 and report["test"]["resized"] == 5
    packed = load_packed(tmp_path / "data" / "packed" / "test.pt")
    assert packed.images.shape == (5, 3, 16, 16)
    with Image.open(next((tmp_path / "data" / "train" / "a").iterdir())) as im:
        assert im.size == (16, 16)
    # resizing keeps duplicates duplicates
    assert report["duplicates"]["test_in_train"] == 1


def test_archive_images_are_resized_to_image_size():
    split = prep.Split(np.stack([_noise(i) for i in range(3)]), np.array([0, 1, 0]), ["x", "y"])
    assert prep.resize_split(split, 32, workers=1) is split
    small = prep.resize_split(split, 8, workers=1)
    assert small.images.shape == (3, 8, 8, 3) and small.resized.tolist() == [True] * 3
    assert prep.split_report(small)["resized"] == 3
    assert prep.find_duplicates(small, small)["test_in_train"] == 3


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image_size", 4, "params.yaml: data.image_size: must be >= 8 (pixels), got 4"),
        (
            "on_bad_image",
            "ignore",
            "params.yaml: data.on_bad_image: unknown choice 'ignore'; choose one of: error, skip",
        ),
    ],
)
def test_bad_data_params_name_the_key(key, value, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(raw).data.image_size == 32  # the default
    raw["data"][key] = value
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value) == message


def test_stage_stops_with_one_line_then_skips_when_asked(tmp_path):
    src = make_image_folder(tmp_path / "src", train_per_class=1, test_per_class=1)
    (src / "test" / "class7" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 half a jpeg")
    repo = make_project(tmp_path / "proj", tiny_params(src))
    proc = run([sys.executable, "-m", "stages.prepare"], cwd=repo, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: data.source: {src}: 1 bad image: test/class7/broken.jpg (")
    assert "data.on_bad_image" in lines[0]
    assert not (repo / "data").exists()

    (repo / "params.yaml").write_text(tiny_params(src, data={"on_bad_image": "skip"}))
    proc = run([sys.executable, "-m", "stages.prepare"], cwd=repo)
    assert "bad images skipped: 1;" in proc.stdout
    report = json.loads((repo / "data" / "prepare_report.json").read_text())
    assert [s["path"] for s in report["test"]["skipped"]] == ["test/class7/broken.jpg"]
    assert torch.load(repo / "data/packed/test.pt", weights_only=True)["images"].shape[0] == 11
