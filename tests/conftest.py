"""Shared fixtures: a tiny learnable ImageFolder made on the fly, and throw-away DVC repos."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg"
CLASSES = [f"class{i}" for i in range(10)]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "cvplay"]


def make_image_folder(
    root: Path, *, train_per_class: int = 12, test_per_class: int = 4, seed: int = 0
) -> Path:
    """train/<class>/ and test/<class>/ with a class-dependent colour, so models can learn it.

    Mixed on purpose: PNG and JPEG files, a grayscale, an RGBA and a 40x40 image, and a
    non-image file that must be ignored.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            base = np.array([(c * 25) % 256, (255 - c * 25) % 256, (c * 70) % 256])
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                im = Image.fromarray(pixels)
                if i % 3 == 0:
                    im.save(d / f"{i:03d}.jpg", quality=95)
                else:
                    im.save(d / f"{i:03d}.png")
            (d / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((32, 32), 128, np.uint8), mode="L").save(
        root / "train" / CLASSES[0] / "gray.png"
    )
    Image.fromarray(np.full((32, 32, 4), 200, np.uint8), mode="RGBA").save(
        root / "train" / CLASSES[1] / "rgba.png"
    )
    Image.fromarray(np.full((40, 40, 3), 60, np.uint8)).save(root / "test" / CLASSES[2] / "big.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "images")


def tool_env() -> dict[str, str]:
    """Environment in which `python` and `dvc` are this interpreter's (the venv's)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "cvplay tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@cvplay.invalid")
    env["GIT_COMMITTER_NAME"] = env["GIT_AUTHOR_NAME"]
    env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_EMAIL"]
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit or a hang show its output in the test failure.

    Output goes through temporary files, not pipes: a process the command leaves behind
    (`dvc queue start` forks its workers) inherits them, and with pipes the call would wait
    for it to exit too.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=err, text=True, timeout=timeout
            )
            problem = f"exited {proc.returncode}" if check and proc.returncode != 0 else ""
        except subprocess.TimeoutExpired:
            proc, problem = None, f"still running after {timeout:.0f} s"
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if problem:
        raise AssertionError(
            f"{' '.join(cmd)} {problem}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )
    proc.stdout, proc.stderr = stdout, stderr
    return proc


def dvc(
    *args: str, cwd: Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check, timeout=timeout)


def make_project(dest: Path, params_yaml: str) -> Path:
    """A fresh git + DVC repo holding this project's pipeline code and the given params."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(params_yaml)
    (dest / ".gitignore").write_text("__pycache__/\n/dvc_plots/\n/data/raw/\n")
    run(["git", "init", "-q", "-b", "main"], cwd=dest)
    dvc("init", "-q", cwd=dest)
    dvc("config", "core.analytics", "false", cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(["git", "commit", "-qm", "init"], cwd=dest)
    return dest


def tiny_params(source: Path | str, **overrides) -> str:
    """The real params.yaml, set for a fast run on tiny data; ``overrides`` per key or section.

    tiny_params(src, model="mlp", train={"epochs": 1}) merges into the train section.
    """
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(source), val_split=20)
    params["train"].update(epochs=2, batch_size=16)
    params["features"].update(weights="none", image_size=32, views=2)
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    return yaml.safe_dump(params, sort_keys=False)
