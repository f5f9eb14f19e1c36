"""Parallel sweeps: dvc exp run --queue + dvc queue start -j 2, on tiny data."""

import json
import os
import signal
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


def _worker_logs(repo) -> str:
    """The queue workers' own output, for a failure message."""
    logs = sorted((repo / ".dvc" / "tmp" / "exps").rglob("dvc-exp-worker-*.out"))
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def _kill_workers(repo) -> None:
    """Stop any queue worker still alive, so that none outlives the test.

    Each worker records its pid in ``<name>.json`` (dvc-task's ManagedProcess) and runs in a
    process group of its own, which holds the experiment it is running.
    """
    dvc("queue", "stop", "--kill", cwd=repo, check=False, timeout=60)
    for info in (repo / ".dvc" / "tmp" / "exps").rglob("dvc-exp-worker-*.json"):
        try:
            pid = json.loads(info.read_text())["pid"]
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass  # already gone, or the file was mid-write


def test_queued_sweep_runs_two_experiments_in_parallel(tiny_folder, tmp_path):
    repo = make_project(tmp_path / "proj", tiny_params(tiny_folder, train={"epochs": 1}))
    dvc("repro", "prepare", cwd=repo)  # shared by both experiments through DVC's run-cache
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "prepared"], cwd=repo)
    dvc("exp", "run", "--queue", "-S", "model=mlp,simplecnn", cwd=repo)
    try:
        # `dvc queue start` returns once its workers are up (run() does not wait on the
        # workers, which inherit its output); the status poll below is the wait.
        started = dvc("queue", "start", "-j", "2", cwd=repo, timeout=120).stdout
        assert "Started '2'" in started, started
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = dvc("queue", "status", cwd=repo, timeout=120).stdout
            finished = status.count("Success") + status.count("Failed")
            if finished == 2 and "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
        else:
            raise AssertionError(f"queue did not finish in 600 s:\n{status}\n{_worker_logs(repo)}")
        assert status.count("Success") == 2, f"{status}\n{_worker_logs(repo)}"
        exps = _exp_metrics(repo)
    finally:
        _kill_workers(repo)
    models = sorted(e["model"] for e in exps.values())
    assert models == ["mlp", "simplecnn"], exps
    for exp in exps.values():
        assert 0 <= exp["val_acc"] <= 1 and 0 <= exp["test_acc"] <= 1
    # Each experiment got its own metrics (the parameter count tells the models apart).
    assert len({e["params"] for e in exps.values()}) == 2
