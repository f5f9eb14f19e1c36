"""torchrun: 2 CPU processes end to end through dvc, against a 1-process run."""

import json

import torch

from tests.conftest import dvc, make_project, tiny_params


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_folder, tmp_path):
    # mlp: no BatchNorm, so two ranks of 16 compute exactly what one process of 32 does
    # (per-rank BatchNorm statistics would differ on CPU, where SyncBatchNorm is unavailable).
    # Tolerance: float32 summation order in the gradient all-reduce, ~1e-7 relative.
    results = {}
    for nproc in (1, 2):
        params = tiny_params(
            tiny_folder, model="mlp", train={"nproc": nproc, "batch_size": 32, "epochs": 2}
        )
        repo = make_project(tmp_path / f"nproc{nproc}", params)
        proc = dvc("repro", cwd=repo)
        if nproc == 2:
            assert "2 process(es)" in proc.stderr
        metrics = json.loads((repo / "metrics/train.json").read_text())
        weights = torch.load(repo / "models/last.pt", weights_only=True)["model"]
        history = (repo / "plots/train/history.csv").read_text().splitlines()
        results[nproc] = (metrics, weights, history)
    (m1, w1, h1), (m2, w2, h2) = results[1], results[2]
    assert m1["best_epoch"] == m2["best_epoch"] and m1["val_acc"] == m2["val_acc"]
    assert abs(m1["val_loss"] - m2["val_loss"]) < 1e-5
    assert len(h1) == len(h2) == 3
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-6), key


def test_batch_size_must_split_over_processes(tiny_folder, tmp_path):
    params = tiny_params(tiny_folder, train={"nproc": 3, "batch_size": 32})
    repo = make_project(tmp_path / "p", params)
    proc = dvc("repro", cwd=repo, check=False)
    assert proc.returncode != 0
    assert "train.batch_size: 32 does not split evenly over train.nproc=3" in proc.stderr
