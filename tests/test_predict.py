"""python -m cvplay predict: real checkpoints from the train stage, real image files, real CLI.

One module fixture runs the real prepare, features and train stages in-process on the tiny
colour-coded ImageFolder (an mlp, which takes images with flip TTA, and the resnet18
transfer head, which takes precomputed features), so predictions can be checked against
the classes and against the evaluation path itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cvplay import paths
from cvplay.__main__ import main
from cvplay.config import parse_params
from cvplay.data import load_packed
from cvplay.engine import predict_logits, tta_views
from cvplay.evaluate import load_checkpoint
from cvplay.loaders import PackedLoader
from cvplay.predict import Predictor, format_table, list_inputs, predict
from cvplay.prepare import prepare, read_image_folder
from cvplay.train import run_train
from cvplay.transfer import FeatureLoader, run_features
from tests.conftest import CLASSES, ROOT, make_image_folder, tiny_params

CPU = torch.device("cpu")


def _params(src: Path, model: str, epochs: int, **train):
    train = {"epochs": epochs, "threads": 0, **train}
    return parse_params(yaml.safe_load(tiny_params(src, model=model, train=train)))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder after prepare, features and train: models/best.pt is an mlp trained
    on the colour-coded classes, models/resnet18.pt a transfer head."""
    root = tmp_path_factory.mktemp("predict")
    src = make_image_folder(root / "src")
    proj = root / "proj"
    proj.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(proj)
        prepare(str(src), max_per_class=None, workers=1)
        params = _params(src, "resnet18", epochs=2)
        run_features(params.features, CPU)
        run_train(params)
        shutil.move(paths.BEST, "models/resnet18.pt")
        # its own lr: the mlp recipe's (0.1 at batch 256) overshoots at tiny_params' batch 16
        run_train(_params(src, "mlp", epochs=8, lr=0.05))
    return proj


def _probs(prediction, classes) -> list[float]:
    """The full probability vector of a Prediction made with topk >= len(classes)."""
    by_class = dict(prediction.top)
    assert sorted(by_class) == sorted(classes)
    return [by_class[c] for c in classes]


def _agrees_with_evaluation(project: Path, checkpoint: Path, loader_of) -> None:
    """Predicting the prepared test PNGs gives the evaluate stage's probabilities."""
    model, cfg, ckpt = load_checkpoint(checkpoint, CPU)
    loader = loader_of(cfg)
    tta = tta_views(cfg.eval.tta, cfg)
    logits, labels = predict_logits(model, loader, tta=tta)
    expected = logits.softmax(1)
    preds = predict([project / paths.TEST_DIR], checkpoint=checkpoint, topk=99, device=CPU)
    assert len(preds) == len(labels) == 41  # 4 per class + big.png
    got = torch.tensor([_probs(p, ckpt["classes"]) for p in preds])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the file order is the packed order: each row's folder is its label
    assert [Path(p.path).parent.name for p in preds] == [CLASSES[y] for y in labels]


def test_image_model_agrees_with_evaluation_and_learns_the_classes(project):
    checkpoint = project / paths.BEST

    def loader_of(cfg):
        test = load_packed(project / paths.PACKED_TEST)
        common = {"batch_size": 7, "device": CPU, "train": False, "seed": 0}
        return PackedLoader(test, torch.arange(len(test.labels)), **common)

    predictor = Predictor(checkpoint, CPU)
    # auto TTA: the mlp trains with flips only, so it is shown the flip pair, no shifts
    assert (predictor.model_name, predictor.tta) == ("mlp", "flip")
    _agrees_with_evaluation(project, checkpoint, loader_of)
    # the source files (JPEG and PNG, not the prepared copies) are classified by colour;
    # big.png is a flat grey 40x40 image of no class colour
    src_test = project.parent / "src" / "test"
    preds = predict([src_test], checkpoint=checkpoint, device=CPU)
    scored = [p for p in preds if Path(p.path).name != "big.png"]
    assert len(scored) == 40 and all(p.error is None for p in scored)
    right = [p.top[0][0] == Path(p.path).parent.name for p in scored]
    assert sum(right) >= 36, [p.path for p, ok in zip(scored, right, strict=True) if not ok]


def test_features_model_rebuilds_the_frozen_backbone_and_agrees_with_evaluation(project):
    checkpoint = project / "models" / "resnet18.pt"

    def loader_of(cfg):
        assert cfg.model == "resnet18" and cfg.features.weights == "none"
        path = project / paths.FEATURES_TEST
        return FeatureLoader(path, None, batch_size=500, device=CPU, train=False, seed=0)

    predictor = Predictor(checkpoint, CPU)
    assert predictor.stem is not None and predictor.tta == "none"
    _agrees_with_evaluation(project, checkpoint, loader_of)


def test_topk_is_sorted_sums_to_one_and_is_clipped_to_the_classes(project):
    files = sorted((project / paths.TEST_DIR / "class4").iterdir())
    preds = predict(files, checkpoint=project / paths.BEST, topk=3, device=CPU)
    for p in preds:
        assert len(p.top) == 3
        probs = [prob for _, prob in p.top]
        assert probs == sorted(probs, reverse=True) and len({c for c, _ in p.top}) == 3
    every = predict(files, checkpoint=project / paths.BEST, topk=50, device=CPU)
    for p, p3 in zip(every, preds, strict=True):
        assert len(p.top) == 10
        assert sum(prob for _, prob in p.top) == pytest.approx(1.0, abs=1e-5)
        assert p.top[:3] == p3.top
    with pytest.raises(ValueError, match="topk: must be >= 1, got 0"):
        predict(files, checkpoint=project / paths.BEST, topk=0, device=CPU)


def _odd_images(folder: Path) -> None:
    """Every kind of file a user's folder may hold; only the images are to be classified."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb).save(folder / "b_photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(
        folder / "c_gray.png"
    )
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)  # alpha varies per pixel
    Image.fromarray(rgba, mode="RGBA").save(folder / "d_rgba.png")
    # 16-bit gray around 30000: prepare keeps the top 8 bits (~117); PIL would make it white
    deep = rng.integers(28000, 32000, (32, 32)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "e_16bit.png")  # mode I;16
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(
        folder / "f_100x60.png"
    )
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "._a_rgb.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")


def test_folder_rows_for_images_only_converted_exactly_as_prepare(project, tmp_path):
    # an ImageFolder source whose train/odd/ is the user's folder, so that prepare's own
    # reading of it is at hand
    odd = tmp_path / "src" / "train" / "odd"
    _odd_images(odd)
    (odd / "sub").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(odd / "sub" / "g_nested.png")
    hidden = odd / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(odd / "a_rgb.png", hidden / "a_rgb-checkpoint.png")
    (tmp_path / "src" / "test" / "odd").mkdir(parents=True)
    shutil.copy(odd / "a_rgb.png", tmp_path / "src" / "test" / "odd" / "x.png")

    predictor = Predictor(project / paths.BEST, CPU)
    preds = list(predictor.predict(list_inputs([odd]), topk=10))
    names = [Path(p.path).relative_to(odd).as_posix() for p in preds]
    assert names == [
        "a_rgb.png",
        "b_photo.jpg",
        "c_gray.png",
        "d_rgba.png",
        "e_16bit.png",
        "f_100x60.png",
        "sub/g_nested.png",
    ]
    assert all(p.error is None for p in preds)

    prepared = read_image_folder(tmp_path / "src", workers=1)["train"]
    assert [Path(p).name for p in prepared.paths] == names[:6]  # prepare is not recursive
    assert set(prepared.modes) == {"RGB", "L", "RGBA", "I;16"} and prepared.resized.sum() == 1
    expected = predictor.probabilities(torch.from_numpy(prepared.images).permute(0, 3, 1, 2))
    got = torch.tensor([_probs(p, predictor.classes) for p in preds[:6]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.fixture
def broken(tmp_path) -> Path:
    """A truncated PNG and a text file, to be named explicitly."""
    png = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(png)
    data = png.read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_explicit_bad_files_give_error_rows_in_place(project, broken):
    class3 = sorted((project / paths.TEST_DIR / "class3").iterdir())
    args = [
        class3[0],
        broken / "broken.png",
        class3[1],
        broken / "notes.txt",
        broken / "missing.png",
        broken / "empty_dir",
        class3[2],
    ]
    (broken / "empty_dir").mkdir()
    (broken / "empty_dir" / "readme.txt").write_text("no images here")
    preds = predict(args, checkpoint=project / paths.BEST, device=CPU)
    assert [p.path for p in preds] == [str(a) for a in args]
    assert [p.error for p in preds] == [
        None,
        "truncated file",
        None,
        "not an image PIL can read",
        "not found",
        "no image files in this folder",
        None,
    ]
    assert all(p.top == [] for p in preds if p.error)
    alone = predict(class3[:3], checkpoint=project / paths.BEST, device=CPU)
    assert [p.top for p in preds if p.error is None] == [p.top for p in alone]
    table = format_table(preds).splitlines()
    assert table[0].split() == ["path", "top-1", "top-2", "top-3"]
    assert re.fullmatch(rf"{re.escape(str(args[1]))} +error: truncated file", table[2])
    assert re.fullmatch(rf"{re.escape(str(args[0]))}( +\S+ \(\d\.\d{{3}}\)){{3}}", table[1])
    only_errors = format_table([p for p in preds if p.error]).splitlines()
    assert len(only_errors) == 5 and only_errors[0] == "path"
    assert re.fullmatch(rf"{re.escape(str(args[4]))} +error: not found", only_errors[3])


def _same_results(preds, expected) -> None:
    """Same files, classes and printed probabilities; the floats themselves may differ in the
    last bits (~1e-7): CPU matrix kernels for 1 row and for many sum in different orders."""
    assert [p.path for p in preds] == [p.path for p in expected]
    assert [[c for c, _ in p.top] for p in preds] == [[c for c, _ in p.top] for p in expected]
    for p, e in zip(preds, expected, strict=True):
        assert [q for _, q in p.top] == pytest.approx([q for _, q in e.top], abs=1e-6)
    assert format_table(preds) == format_table(expected)


def test_batching_does_not_change_results(project, broken):
    folder = project.parent / "src" / "test" / "class7"
    files = [i.path for i in list_inputs([folder])]
    checkpoint = project / paths.BEST
    as_folder = predict([folder], checkpoint=checkpoint, device=CPU)
    assert len(as_folder) == len(files) == 4
    one_by_one = [predict([f], checkpoint=checkpoint, device=CPU)[0] for f in files]
    _same_results(one_by_one, as_folder)
    # failed files anywhere in a batch leave the other rows in place
    mixed = [*files[:2], broken / "broken.png", *files[2:], broken / "notes.txt"]
    predictor = Predictor(checkpoint, CPU)
    for batch_size in (1, 2, 3, 256):
        preds = list(predictor.predict(list_inputs(mixed), batch_size=batch_size))
        assert [p.error is None for p in preds] == [True, True, False, True, True, False]
        _same_results([p for p in preds if p.error is None], as_folder)


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "cvplay", "predict", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_cli_table_and_json_agree_with_the_library(project, broken):
    folder = Path("data") / "test" / "class5"  # relative to the project: default checkpoint
    args = [folder, broken / "broken.png", "--topk", "2", "--batch-size", "3"]
    table = _cli(*args, cwd=project)
    as_json = _cli(*args, "--json", cwd=project)
    assert table.returncode == as_json.returncode == 1, table.stderr + as_json.stderr
    assert table.stderr == as_json.stderr == ""

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        expected = predict([folder, broken / "broken.png"], topk=2, device=CPU)
    assert len(expected) == 5 and expected[-1].error == "truncated file"
    assert table.stdout == format_table(expected) + "\n"
    rows = json.loads(as_json.stdout)
    assert [r["path"] for r in rows] == [p.path for p in expected]
    assert rows[-1] == {"path": str(broken / "broken.png"), "error": "truncated file"}
    for row, p in zip(rows[:-1], expected[:-1], strict=True):
        assert [t["class"] for t in row["top"]] == [c for c, _ in p.top]
        assert [t["prob"] for t in row["top"]] == pytest.approx([q for _, q in p.top], abs=1e-6)


def test_cli_all_good_files_exit_0_and_missing_checkpoint_exits_2(project, tmp_path):
    ok = _cli(project / paths.TEST_DIR / "class0" / "00000.png", cwd=project)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 2
    missing = _cli(project / paths.TEST_DIR, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stdout == ""
    assert missing.stderr == "error: models/best.pt: not found; run 'dvc repro train' first\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict"], "the following arguments are required: PATH"),
        (["predict", "x.png", "--topk", "0"], "argument --topk: must be >= 1, got 0"),
        (["predict", "x.png", "--batch-size", "two"], "argument --batch-size: not an integer"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
