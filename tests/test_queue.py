"""Parallel sweeps: dvc exp run --queue + dvc queue start -j 2, on tiny data."""

import json
import time

from tests.conftest import dvc, make_project, run, tiny_params


def _exp_metrics(repo) -> dict[str, dict]:
    """{experiment name: {"model": ..., "val_acc": ..., "test_acc": ...}} from exp show."""
    out = {}
    for entry in json.loads(dvc("exp", "show", "--json", cwd=repo).stdout):
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev["data"]
                metrics = data.get("metrics") or {}
                out[rev.get("name")] = {
                    "model": data["params"]["params.yaml"]["data"]["model"],
                    "val_acc": metrics.get("metrics/train.json", {}).get("data", {}).get("val_acc"),
                    "params": metrics.get("metrics/train.json", {}).get("data", {}).get("params"),
                    "test_acc": metrics.get("metrics/eval.json", {})
                    .get("data", {})
                    .get("test_acc"),
                }
    return out


def test_queued_sweep_runs_two_experiments_in_parallel(tiny_folder, tmp_path):
    repo = make_project(tmp_path / "proj", tiny_params(tiny_folder, train={"epochs": 1}))
    dvc("repro", "prepare", cwd=repo)  # shared by both experiments through DVC's run-cache
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "prepared"], cwd=repo)
    dvc("exp", "run", "--queue", "-S", "model=mlp,simplecnn", cwd=repo)
    dvc("queue", "start", "-j", "2", cwd=repo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"queue did not finish in time:\n{status}")
    assert status.count("Success") == 2, status
    exps = _exp_metrics(repo)
    models = sorted(e["model"] for e in exps.values())
    assert models == ["mlp", "simplecnn"], exps
    for exp in exps.values():
        assert 0 <= exp["val_acc"] <= 1 and 0 <= exp["test_acc"] <= 1
    # Each experiment got its own metrics (the parameter count tells the models apart).
    assert len({e["params"] for e in exps.values()}) == 2
