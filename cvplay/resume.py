"""Resume an interrupted train stage from its last completed epoch.

DVC 3 has no checkpoints, and ``persist: true`` outputs turn off DVC's run-cache, so the
resume state lives outside the stage's outputs: one scratch file per run in
``.cvplay/resume/<key>.pt`` (git-ignored, not tracked by DVC). The key is a hash of
everything that decides the run's result: the resolved params, the source of the
``cvplay`` package, the content of the training data files, the device type and the number
of processes. A different config, code or data gets a different key, so it can never pick
up another run's state; it starts from scratch.

After every completed epoch the state is written atomically (a kill at any moment leaves the
previous epoch's file or the new one): model, optimizer, LR scheduler, EMA weights, every
RNG the run draws from (torch, CUDA, Python, NumPy and the train loader's generator), the
history and the best-so-far weights. Re-running the stage (``dvc repro``, ``dvc exp run``)
after Ctrl-C, SIGTERM or SIGKILL finds the file, restores it and continues with the next
epoch; the finished run's metrics and checkpoints are identical to an uninterrupted run's.
The file is deleted when the stage succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvplay.errors import CvplayError
from cvplay.io import save_torch

RESUME_DIR = Path(".cvplay") / "resume"
_PACKAGE = Path(__file__).resolve().parent


def _file_digest(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)


def run_key(config: dict[str, Any], data_files: Iterable[Path], *, device: str, world: int) -> str:
    """A hash of what decides a training run's result (see the module docstring)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"device={device} world={world}".encode())
    for src in sorted(_PACKAGE.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for path in data_files:
        h.update(str(path).encode())
        _file_digest(path, h)
    return h.hexdigest()


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG a training epoch may draw from, in a form ``weights_only`` loading accepts."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "loader": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


class ResumeStore:
    """The scratch state file of one run; only the writing rank (``write``) saves/clears."""

    def __init__(self, key: str, *, directory: Path = RESUME_DIR, write: bool = True):
        self.path = directory / f"{key}.pt"
        self.write = write

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses pickled code; a foreign file is refused
            raise CvplayError(
                f"{self.path}: cannot read the resume state ({type(exc).__name__}); delete it "
                "to train from scratch"
            ) from None

    def save(self, state: dict[str, Any]) -> None:
        if self.write:
            save_torch(self.path, state)

    def clear(self) -> None:
        if self.write:
            self.path.unlink(missing_ok=True)
            # temporary files of this run's writes that a kill cut short
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only when no other run's state is waiting
                os.rmdir(self.path.parent)
