"""Interrupted training resumes bit-exactly; reruns are byte-identical; unsafe files are refused.

Real training subprocesses on a tiny ImageFolder. CVPLAY_PAUSE_AT=EPOCH:BATCH makes the
train stage print "paused at ..." and wait at an exact point (cvplay.train.PauseAt), where the
test sends the signal from outside, as a user's Ctrl-C or a scheduler's kill would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import dvc, make_project, run, tiny_params, tool_env

OUTPUTS = [
    "metrics/train.json",
    "plots/train/history.csv",
    "models/best.pt",
    "models/last.pt",
]


def _params(source: Path, **train) -> str:
    # mlp with EMA, lookahead, label smoothing, onecycle and alternating flips: model,
    # optimizer, scheduler, EMA and lookahead state and the flips' epoch all have to come back
    # for a resumed run to match.
    recipe = {"epochs": 3, "batch_size": 16, "ema": 0.9, "lookahead": 0.9, "label_smoothing": 0.1}
    return tiny_params(
        source, model="mlp", train={**recipe, "augment": "crop_altflip", "crop_padding": 2, **train}
    )


@pytest.fixture(scope="module")
def project(tiny_folder, tmp_path_factory) -> Path:
    path = make_project(tmp_path_factory.mktemp("reliability") / "proj", _params(tiny_folder))
    run([sys.executable, "-m", "stages.prepare"], cwd=path)
    return path


def _train(path: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.train"], cwd=path, check=check)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in OUTPUTS}


def _clear_outputs(path: Path) -> None:
    # What DVC does before it re-runs a stage.
    shutil.rmtree(path / "models", ignore_errors=True)
    for name in OUTPUTS:
        (path / name).unlink(missing_ok=True)


def _resume_files(path: Path) -> list[Path]:
    d = path / ".cvplay" / "resume"
    return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture(scope="module")
def baseline(project) -> dict[str, bytes]:
    _train(project)
    assert _resume_files(project) == []  # removed on success
    return _snapshot(project)


def test_two_runs_are_byte_identical(project, baseline):
    _clear_outputs(project)
    _train(project)
    again = _snapshot(project)
    assert again.keys() == baseline.keys()
    for name in OUTPUTS:
        assert again[name] == baseline[name], f"{name} differs between two runs"
    a = torch.load(project / "models/best.pt", weights_only=True)["model"]
    assert a and all(torch.is_tensor(v) for v in a.values())


def test_folder_loader_with_workers_is_reproducible(tiny_folder, tmp_path):
    params = _params(tiny_folder, loader="folder", num_workers=2, epochs=2, augment="crop_flip")
    path = make_project(tmp_path / "proj", params)
    run([sys.executable, "-m", "stages.prepare"], cwd=path)
    _train(path)
    first = _snapshot(path)
    _clear_outputs(path)
    _train(path)
    assert _snapshot(path) == first


def _start_paused(path: Path, at: str, cmd: list[str] | None = None) -> subprocess.Popen:
    """Start training with CVPLAY_PAUSE_AT and return once it reports the pause."""
    env = {**tool_env(), "CVPLAY_PAUSE_AT": at}
    proc = subprocess.Popen(
        cmd or [sys.executable, "-m", "stages.train"],
        cwd=path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a kill reaches dvc and the stage
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"paused at {at}"):
            return proc
        assert time.monotonic() < deadline, "".join(lines)
    proc.wait()
    raise AssertionError(f"exited {proc.returncode} before pausing:\n{''.join(lines)}")


EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


@pytest.mark.parametrize("at", ["2:0", "2:3"], ids=["epoch-boundary", "mid-epoch"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=str)
def test_interrupted_run_resumes_to_the_same_result(project, baseline, sig, at):
    _clear_outputs(project)
    shutil.rmtree(project / ".cvplay", ignore_errors=True)
    proc = _start_paused(project, at)
    proc.send_signal(sig)
    try:
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT[sig], rest
    if sig != signal.SIGKILL:
        assert rest.strip().splitlines()[-1].startswith(f"interrupted ({sig.name})"), rest
    states = _resume_files(project)
    assert [p.suffix for p in states] == [".pt"], states  # no temporary file left behind
    assert torch.load(states[0], weights_only=True)["epoch"] == 1

    _clear_outputs(project)
    resumed = _train(project)
    assert "resuming after epoch 1" in resumed.stderr
    assert "epoch   1 " not in resumed.stdout and "epoch   2 " in resumed.stdout
    assert _snapshot(project) == baseline
    assert _resume_files(project) == []


def test_another_config_never_resumes_from_this_ones_state(project, baseline):
    original = (project / "params.yaml").read_text()
    proc = _start_paused(project, "3:0")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(_resume_files(project)) == 1
    try:
        changed = yaml.safe_load(original)
        changed["train"]["lr"] = 0.01
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        other = _train(project)
        assert "resuming" not in other.stderr and "epoch   1 " in other.stdout
        assert len(_resume_files(project)) == 1  # the first config's state is still waiting
    finally:
        (project / "params.yaml").write_text(original)
    resumed = _train(project)
    assert "resuming after epoch 2" in resumed.stderr
    assert _snapshot(project) == baseline
    assert _resume_files(project) == []


def test_dvc_repro_resumes_after_kill_and_keeps_the_run_cache(tiny_folder, baseline, tmp_path):
    """The user's view: `dvc repro` killed mid-epoch, `dvc repro` again finishes the job."""
    project = make_project(tmp_path / "proj", _params(tiny_folder))
    dvc("repro", "prepare", "features", cwd=project)
    proc = _start_paused(project, "2:3", [sys.executable, "-m", "dvc", "repro"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    again = dvc("repro", cwd=project)
    assert "Running stage 'train'" in again.stdout
    assert "resuming after epoch 1" in again.stdout + again.stderr
    assert _snapshot(project) == baseline
    assert _resume_files(project) == []
    assert dvc("status", cwd=project).stdout.strip() == "Data and pipelines are up to date."
    # The run-cache still serves this config: another lr, then back, restores without training.
    original = (project / "params.yaml").read_text()
    changed = yaml.safe_load(original)
    changed["train"]["lr"] = 0.02
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    dvc("repro", cwd=project)
    (project / "params.yaml").write_text(original)
    back = dvc("repro", cwd=project)
    assert "Stage 'train' is cached - skipping run, checking out outputs" in back.stdout
    assert _snapshot(project) == baseline


class Payload:
    """Unpickling this runs a command: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_everywhere(project, baseline, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "config": {}, "classes": []}, evil)

    # 1. a checkpoint handed to evaluate
    (project / "models").mkdir(exist_ok=True)
    shutil.copy(evil, project / "models" / "best.pt")
    proc = run([sys.executable, "-m", "stages.evaluate"], cwd=project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "models/best.pt: not a cvplay checkpoint or unsafe to load" in proc.stderr

    # 2. features.weights pointing at it
    original = (project / "params.yaml").read_text()
    try:
        changed = yaml.safe_load(original)
        changed["features"]["weights"] = str(evil)
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        proc = run([sys.executable, "-m", "stages.features"], cwd=project, check=False)
        assert proc.returncode == 2 and "not loadable safely" in proc.stderr, proc.stderr
    finally:
        (project / "params.yaml").write_text(original)

    # 3. a planted resume state and 4. a planted packed data file
    _clear_outputs(project)
    proc = _start_paused(project, "2:0")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (state,) = _resume_files(project)
    shutil.copy(evil, state)
    proc = _train(project, check=False)
    assert proc.returncode == 2 and "cannot read the resume state" in proc.stderr, proc.stderr
    state.unlink()
    packed = project / "data" / "packed" / "train.pt"
    saved = packed.read_bytes()
    try:
        shutil.copy(evil, packed)
        proc = _train(project, check=False)
        assert proc.returncode == 2 and "data/packed/train.pt" in proc.stderr, proc.stderr
    finally:
        packed.write_bytes(saved)
    assert not marker.exists()


def test_prepare_twice_gives_byte_identical_files(tiny_folder, tmp_path):
    """DVC hashes the prepared files: a rerun must not change them, or everything downstream
    would re-run (torch.save names its archive after the temporary file unless told not to)."""
    from cvplay.prepare import prepare

    outs = []
    for name in ("a", "b"):
        prepare(str(tiny_folder), max_per_class=None, out_dir=tmp_path / name, workers=1)
        outs.append(
            {
                p.relative_to(tmp_path / name): p.read_bytes()
                for p in sorted((tmp_path / name).rglob("*"))
                if p.is_file()
            }
        )
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 100
    assert outs[0] == outs[1]
