"""bench.table: each model's recipe in turn on tiny data, through DVC and without it."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, dvc, make_project, run, tiny_params

TABLE = [sys.executable, "-m", "bench.table"]


@pytest.fixture
def project(tmp_path, tiny_folder) -> Path:
    dest = make_project(tmp_path / "proj", tiny_params(tiny_folder, train={"epochs": 1}))
    shutil.copytree(ROOT / "bench", dest / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def cells(line: str) -> list[str]:
    return line.strip().removeprefix("| ").removesuffix(" |").split(" | ")


def test_stages_runner_records_each_model_and_puts_params_back(project, tiny_folder):
    before = (project / "params.yaml").read_text()
    proc = run([*TABLE, "--runner", "stages", "--models", "mlp,simplecnn", "--source",
                str(tiny_folder), "--set", "train.amp_cpu=false", "--out", "rows.md"],
               cwd=project)  # fmt: skip
    rows = (project / "rows.md").read_text().splitlines()
    assert proc.stdout.splitlines() == rows
    assert [cells(r)[0] for r in rows] == ["mlp", "simplecnn"]
    for model, line in zip(["mlp", "simplecnn"], rows, strict=True):
        c = cells(line)
        assert 0 <= float(c[1]) <= 1 and 0 <= float(c[2]) <= 1
        assert c[3] == "1"  # the params.yaml's train.epochs, not the recipe's 10
        assert c[-1] == (
            f"`dvc exp run -S data.source={tiny_folder} -S features.weights=none "
            f"-S model={model} -S train.amp_cpu=false`"
        )
    # the rows are each run's own figures: the workspace holds the last model's
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert cells(rows[1])[2] == f"{evaluation['test_acc']:.4f}"
    assert proc.stderr.count("stages.prepare") == 1  # prepared once for both models
    assert (project / "params.yaml").read_text() == before


def test_dvc_runner_runs_an_experiment_per_model(project, tiny_folder):
    proc = run([*TABLE, "--models", "mlp", "--source", str(tiny_folder)], cwd=project)
    [line] = proc.stdout.splitlines()
    assert cells(line)[0] == "mlp"
    evaluation = json.loads((project / "metrics" / "eval.json").read_text())
    assert cells(line)[2] == f"{evaluation['test_acc']:.4f}"
    # dvc exp run applied its params to the workspace, and the pipeline is up to date there
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["model"] == "mlp" and params["features"]["weights"] == "none"
    assert "up to date" in dvc("status", cwd=project).stdout
    assert dvc("exp", "list", "--name-only", cwd=project).stdout.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "vgg99"], "--models: unknown vgg99; choose from mlp, simplecnn"),
        (["--set", "train.epoch=3"], "--set train.epoch: no such key in params.yaml"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--set", "train.optimizer=lion"], "sgd, adamw"),
        (["--set", "amp"], "--set 'amp': expected KEY=VALUE"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(project, args, message):
    before = (project / "params.yaml").read_text()
    proc = run([*TABLE, "--runner", "stages", *args], cwd=project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (project / "data").exists()
    assert (project / "params.yaml").read_text() == before


def test_a_failing_model_is_reported_and_params_are_put_back(project, tmp_path):
    before = (project / "params.yaml").read_text()
    proc = run([*TABLE, "--runner", "stages", "--models", "mlp", "--source",
                str(tmp_path / "missing")], cwd=project, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "error: data.source: " in proc.stderr  # the stage's own message, passed through
    assert "stages.prepare exited 2" in proc.stderr
    assert "stages.train" not in proc.stderr  # nothing trains on data that failed to prepare
    assert proc.stderr.strip().endswith("error: failed: mlp")
    assert proc.stdout == ""
    assert (project / "params.yaml").read_text() == before
