"""Sharing results: a teammate's clone pulls them from a DVC remote instead of recomputing.

Driven through the real git and dvc CLIs. One project runs the pipeline, pushes its cache
to a local-directory DVC remote and its commits to a bare git repo (every clone's
`origin`); fresh clones of that repo must find every stage up to date after `dvc pull`,
and an experiment must travel with `dvc exp push` / `dvc exp pull`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc, make_project, run, tiny_params

UP_TO_DATE = "Data and pipelines are up to date."
# Outputs compared byte for byte between the original project and a clone: metrics (in
# git), and cached outputs of every stage (from the DVC remote).
COMPARED = (
    "metrics/train.json",
    "metrics/eval.json",
    "models/best.pt",
    "models/last.pt",
    "plots/train/curves.png",
    "data/prepare_report.json",
    "data/packed/train.pt",
    "data/features/train.pt",
)


@dataclass(frozen=True)
class Team:
    project: Path  # where the pipeline ran
    git_remote: Path  # bare repo: the project's and every clone's `origin`
    store: Path  # the DVC remote `shared` (a local directory)
    baseline: dict[str, bytes]  # COMPARED files as the baseline commit produced them
    baseline_pngs: int  # prepared images in data/train and data/test


@pytest.fixture(scope="module")
def team(tiny_folder, tmp_path_factory) -> Team:
    """The baseline run, committed and pushed: cache to the DVC remote, commits to git."""
    base = tmp_path_factory.mktemp("remote")
    # mlp, one epoch: the cheapest run; the features stage still runs (train reads it).
    project = make_project(
        base / "project", tiny_params(tiny_folder, model="mlp", train={"epochs": 1})
    )
    dvc("repro", cwd=project)
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-qm", "baseline"], cwd=project)

    store = base / "dvc-store"  # absolute, so clones resolve it to the same directory
    store.mkdir()
    dvc("remote", "add", "-d", "shared", str(store), cwd=project)
    run(["git", "commit", "-qam", "DVC remote 'shared'"], cwd=project)
    dvc("push", cwd=project)

    git_remote = base / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], cwd=base)
    run(["git", "remote", "add", "origin", str(git_remote)], cwd=project)
    run(["git", "push", "-q", "origin", "main"], cwd=project)
    return Team(
        project=project,
        git_remote=git_remote,
        store=store,
        baseline={name: (project / name).read_bytes() for name in COMPARED},
        baseline_pngs=count_pngs(project),
    )


def count_pngs(repo: Path) -> int:
    return sum(1 for split in ("train", "test") for _ in (repo / "data" / split).rglob("*.png"))


def clone(team: Team, dest: Path) -> Path:
    run(["git", "clone", "-q", str(team.git_remote), str(dest)], cwd=dest.parent)
    return dest


def stored_files(root: Path) -> set[str]:
    """Content-addressed files under a DVC cache or a local DVC remote (same layout)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def models_dir_hash(repo: Path) -> str:
    """The md5 of the `models` output as recorded in this checkout's dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models"]
    return out["md5"]


def in_cache(repo: Path, md5: str) -> bool:
    return (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def assert_nothing_to_run(repo: Path) -> None:
    assert dvc("status", cwd=repo).stdout.strip() == UP_TO_DATE
    repro = dvc("repro", cwd=repo).stdout
    assert "Running stage" not in repro
    assert UP_TO_DATE in repro


def test_push_uploads_every_cached_output(team):
    assert "dvc-store" in (team.project / ".dvc" / "config").read_text()
    tracked = run(["git", "ls-files"], cwd=team.project).stdout.split()
    assert ".dvc/config" in tracked
    pushed = stored_files(team.store)
    assert pushed and pushed <= stored_files(team.project / ".dvc" / "cache")
    assert in_cache(team.project, models_dir_hash(team.project))
    status = dvc("status", "--cloud", cwd=team.project).stdout
    assert "in sync" in status, status


def test_clone_pulls_results_instead_of_recomputing(team, tmp_path):
    teammate = clone(team, tmp_path / "teammate")
    assert not (teammate / ".dvc" / "cache").exists()
    assert not (teammate / "models").exists()
    # Without the pull nothing is up to date: the stages would all run again.
    status = dvc("status", cwd=teammate).stdout
    assert UP_TO_DATE not in status and "not in cache" in status, status

    dvc("pull", cwd=teammate)

    fetched = stored_files(teammate / ".dvc" / "cache")
    assert fetched and fetched <= stored_files(team.store)
    assert_nothing_to_run(teammate)
    for name in COMPARED:
        assert (teammate / name).read_bytes() == team.baseline[name], name
    assert count_pngs(teammate) == team.baseline_pngs > 0


def test_experiment_travels_with_exp_push_and_pull(team, tmp_path):
    project = team.project
    dvc("exp", "run", "-n", "e1", "-S", "train.epochs=2", cwd=project)
    e1 = {name: (project / name).read_bytes() for name in COMPARED}
    assert e1["models/best.pt"] != team.baseline["models/best.pt"]
    assert e1["metrics/train.json"] != team.baseline["metrics/train.json"]
    # The experiment's git ref goes to `origin`, its cached outputs to the DVC remote.
    pushed = dvc("exp", "push", "origin", "e1", cwd=project).stdout
    assert "Pushed experiment e1" in pushed, pushed
    assert in_cache(project, models_dir_hash(project))
    e1_models = models_dir_hash(project)
    assert (team.store / "files" / "md5" / e1_models[:2] / e1_models[2:]).is_file()

    # A fresh clone that never ran `dvc pull`: `dvc exp pull` alone brings the data.
    teammate = clone(team, tmp_path / "teammate")
    assert "e1" in dvc("exp", "list", "origin", cwd=teammate).stdout
    assert "e1" not in dvc("exp", "list", cwd=teammate).stdout
    baseline_models = models_dir_hash(teammate)
    assert baseline_models != e1_models

    dvc("exp", "pull", "origin", "e1", cwd=teammate)

    assert "e1" in dvc("exp", "list", cwd=teammate).stdout
    shown = json.loads(dvc("exp", "show", "--json", cwd=teammate).stdout)
    epochs = {
        rev.get("name"): rev["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
        for entry in shown
        for exp in entry.get("experiments") or []
        for rev in exp.get("revs", [])
    }
    assert epochs.get("e1") == 2, epochs
    # Only the experiment's outputs were fetched, not the baseline commit's.
    assert in_cache(teammate, e1_models)
    assert not in_cache(teammate, baseline_models)

    dvc("exp", "apply", "e1", cwd=teammate)

    params = yaml.safe_load((teammate / "params.yaml").read_text())
    assert params["train"]["epochs"] == 2
    assert_nothing_to_run(teammate)
    for name in COMPARED:
        assert (teammate / name).read_bytes() == e1[name], name
    assert count_pngs(teammate) == team.baseline_pngs
