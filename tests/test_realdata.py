"""Opt-in: the real CIFAR-10 images (runs where ../shared/data/cifar10-jpg exists)."""

import json

import pytest

from tests.conftest import SHARED_CIFAR, dvc, make_project, tiny_params

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"{SHARED_CIFAR} not present"),
]


def test_real_cifar10_subset_trains_above_chance(tmp_path):
    params = tiny_params(
        SHARED_CIFAR,
        data={"max_per_class": 50, "val_split": 50},
        train={
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.002,
            "optimizer": "adamw",
            "scheduler": "none",
        },
    )
    repo = make_project(tmp_path / "proj", params)
    dvc("repro", cwd=repo)
    report = json.loads((repo / "data/prepare_report.json").read_text())
    assert report["train"]["per_class"] == [50] * 10 and report["test"]["images"] == 10000
    assert report["classes"][:3] == ["airplane", "automobile", "bird"]
    test_acc = json.loads((repo / "metrics/eval.json").read_text())["test_acc"]
    # Chance is 0.10; on 10000 test images 0.15 is far outside chance's spread (~0.003).
    assert test_acc > 0.15, test_acc
