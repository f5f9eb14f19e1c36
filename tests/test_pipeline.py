"""End to end through the real dvc CLI in a throw-away git repo, on a tiny ImageFolder."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import dvc, make_project, run, tiny_params


@pytest.fixture(scope="module")
def repo(tiny_folder, tmp_path_factory) -> Path:
    """A project that has run `dvc repro` once and committed the result as its baseline."""
    path = make_project(tmp_path_factory.mktemp("e2e") / "proj", tiny_params(tiny_folder))
    proc = dvc("repro", cwd=path)
    for stage in ("prepare", "features", "train", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout
    run(["git", "add", "-A"], cwd=path)
    run(["git", "commit", "-qm", "baseline"], cwd=path)
    return path


def test_repro_writes_metrics_checkpoints_and_plots(repo):
    train = json.loads((repo / "metrics/train.json").read_text())
    assert {"val_acc", "val_loss", "best_epoch", "params", "forward_mflops"} <= train.keys()
    timing = json.loads((repo / "logs/train_timing.json").read_text())
    assert timing["train_seconds"] > 0 and timing["images_per_s"] > 0
    # The run names its machine (CPU model, threads, GPU): its wall time means nothing without.
    assert "torch threads" in timing["machine"] and "torch 2." in timing["machine"]
    assert timing["autocast"] == "none"  # train.amp_cpu is off by default: fp32 on the CPU
    assert timing["newton_schulz"] == "fp32"  # simplecnn's Muon; train.muon_bf16_cpu off
    assert 0 <= train["val_acc"] <= 1 and train["best_epoch"] in (1, 2)
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert {"test_acc", "test_loss", "per_class_acc"} <= ev.keys()
    assert len(ev["per_class_acc"]) == 10
    ckpt = torch.load(repo / "models/best.pt", weights_only=True)
    assert ckpt["config"]["model"] == "simplecnn" and ckpt["epoch"] == train["best_epoch"]
    assert torch.load(repo / "models/last.pt", weights_only=True)["epoch"] == 2
    history = (repo / "plots/train/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_acc,val_loss,val_acc,lr" and len(history) == 3
    assert len((repo / "plots/eval/confusion.csv").read_text().splitlines()) == 41 + 1
    assert train["checkpoint_mb"] == round((repo / "models/best.pt").stat().st_size / 1e6, 2)
    per_class = (repo / "plots/eval/per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,accuracy" and len(per_class) == 11
    for png in (
        "plots/train/curves.png",
        "plots/train/augmented.png",
        "plots/eval/confusion.png",
        "plots/eval/misclassified.png",
    ):
        assert (repo / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # DVC outputs are not in git; metrics and plot series are.
    tracked = run(["git", "ls-files"], cwd=repo).stdout.split()
    assert "metrics/train.json" in tracked and "dvc.lock" in tracked
    assert not any(
        t.startswith(("data/", "models/")) and t.endswith((".pt", ".png")) for t in tracked
    )


def test_second_repro_runs_no_stage(repo):
    proc = dvc("repro", cwd=repo)
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date" in proc.stdout
    assert dvc("status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."


def test_exp_run_switches_model_and_is_recorded(repo):
    before = json.loads((repo / "metrics/train.json").read_text())
    proc = dvc("exp", "run", "-n", "vgg", "-S", "model=minivgg", cwd=repo)
    assert "Stage 'prepare' didn't change, skipping" in proc.stdout
    assert "Running stage 'train'" in proc.stdout
    after = json.loads((repo / "metrics/train.json").read_text())
    assert after["params"] != before["params"]
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    models = []
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                params = rev["data"]["params"]["params.yaml"]["data"]
                models.append((rev.get("name"), params["model"]))
    assert ("vgg", "minivgg") in models
    diff = json.loads(dvc("metrics", "diff", "--all", "--json", cwd=repo).stdout)
    assert "val_acc" in diff["metrics/train.json"]
    assert "test_acc" in diff["metrics/eval.json"]
    ckpt = torch.load(repo / "models/best.pt", weights_only=True)
    assert ckpt["config"]["model"] == "minivgg"


def test_airbench_whitening_is_set_from_the_runs_training_images(repo):
    from cvplay.data import load_packed, split_indices
    from cvplay.models import build_model
    from cvplay.train import data_init_sample

    dvc("exp", "run", "-S", "model=airbench", "-S", "train.warmup_epochs=1", cwd=repo)
    ckpt = torch.load(repo / "models/best.pt", weights_only=True)
    config = ckpt["config"]
    assert config["model"] == "airbench" and config["train"]["scheduler"] == "triangle"
    packed = load_packed(repo / "data/packed/train.pt")
    train_idx, _ = split_indices(len(packed.labels), config["data"]["val_split"], config["seed"])
    model = build_model("airbench", num_classes=10, model_args={})
    fresh = model.whiten.weight.clone()
    model.data_init(data_init_sample(packed, train_idx, config["seed"]))
    # the filters come from this run's training images and stay frozen through training
    assert torch.equal(ckpt["model"]["whiten.weight"], model.whiten.weight)
    assert not torch.allclose(ckpt["model"]["whiten.weight"], fresh)


def test_plots_show_writes_html_with_every_plot(repo, tmp_path):
    out = tmp_path / "plots_html"
    dvc("plots", "show", "-o", str(out), cwd=repo)
    html = (out / "index.html").read_text()
    for title in (
        "Loss per epoch",
        "Accuracy per epoch",
        "Learning rate per epoch",
        "Test confusion matrix",
        "Test accuracy per class",
    ):
        assert title in html
    assert html.count("vegaEmbed(") >= 4
    for png in ("curves.png", "augmented.png", "confusion.png", "misclassified.png"):
        assert png in html


def _params_with(repo: Path, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            params[section][name] = value
        else:
            params[section] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(
    ("change", "message", "dvc_message"),
    [
        (
            {"model": "resnet1000"},
            "model: unknown choice 'resnet1000'; choose one of: airbench, minivgg, mlp",
            # the train stage depends on models.${model}: DVC stops before the stage runs
            "Parameters 'models.resnet1000' are missing from 'params.yaml'",
        ),
        (
            {"train.epochs": "ten"},
            "train.epochs: expected int, got 'ten'",
            "train.epochs: expected int, got 'ten'",
        ),
    ],
)
def test_bad_params_stop_the_stage_with_one_line(repo, change, message, dvc_message):
    original = (repo / "params.yaml").read_text()
    try:
        _params_with(repo, **change)
        proc = run([sys.executable, "-m", "stages.train"], cwd=repo, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
        proc = dvc("repro", cwd=repo, check=False)
        assert proc.returncode != 0 and dvc_message in proc.stderr + proc.stdout
    finally:
        (repo / "params.yaml").write_text(original)


def test_missing_data_source_fails_in_prepare(repo, tmp_path):
    original = (repo / "params.yaml").read_text()
    try:
        _params_with(repo, **{"data.source": str(tmp_path / "gone")})
        proc = run([sys.executable, "-m", "stages.prepare"], cwd=repo, check=False)
        assert proc.returncode == 2
        assert (
            proc.stderr.startswith("error: data.source:") and "gone does not exist" in proc.stderr
        )
        assert (repo / "data/packed/train.pt").exists()  # previous outputs untouched
    finally:
        (repo / "params.yaml").write_text(original)
