"""Run the accuracy table: each model's recipe in turn, printing and recording its row.

    python -m bench.table                                   # dvc exp run per model
    python -m bench.table --models airbench,resnet9 --set train.amp_cpu=true --write
    python -m bench.table --runner stages --out rows.md     # no DVC needed (a GPU box)

Every model runs as `dvc exp run -S data.source=SOURCE -S features.weights=none -S model=X`
plus the --set overrides, the command that each row names. `--runner stages` runs the same
pipeline without DVC (the stage commands of dvc.yaml: prepare once, then train and evaluate
per model) on a params.yaml with the overrides written in, and puts the original params.yaml
back at the end; it is for a machine that has PyTorch but not DVC, such as a borrowed GPU.
Each row is printed on stdout (the runs' own output goes to stderr) and appended to --out
as soon as its model finishes, so a run cut short keeps the rows it finished. A model that
fails is reported and the rest still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.accuracy import ACCURACY, minutes, row, store
from cvplay.config import PARAMS_FILE, ConfigError, parse_params
from cvplay.models import MODEL_INPUTS

# The models of issue 5's table, in its order.
TABLE_MODELS = (
    "mlp",
    "simplecnn",
    "simpleresnet",
    "minivgg",
    "resnet9",
    "airbench",
    "vit_tiny",
    "preactresnet18",
)
DEFAULT_SOURCE = "../shared/data/cifar10-jpg"


def parse_set(item: str) -> tuple[str, object]:
    """``train.amp_cpu=true`` -> ("train.amp_cpu", True): the value is read as YAML, as by
    `dvc exp run -S`."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.amp_cpu=true")
    return key, yaml.safe_load(value)


def apply_set(raw: dict, key: str, value: object) -> None:
    """Set a dotted key of params.yaml that exists there (unknown keys would be refused
    later anyway; saying so here names the key as typed)."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise ConfigError(f"--set {key}: no such key in {PARAMS_FILE}")
    node[last] = value


def overrides(source: str, model: str, sets: list[tuple[str, object]]) -> list[tuple[str, object]]:
    return [("data.source", source), ("features.weights", "none"), ("model", model), *sets]


def set_args(pairs: list[tuple[str, object]]) -> list[str]:
    """["-S", "key=value", ...], each value written back as YAML (strings as they are)."""
    args = []
    for key, value in pairs:
        if not isinstance(value, str):
            value = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        args += ["-S", f"{key}={value}"]
    return args


def command(pairs: list[tuple[str, object]]) -> str:
    """The `dvc exp run` command line that reproduces a run with these overrides."""
    return shlex.join(["dvc", "exp", "run", *set_args(pairs)])


def resolved_params(base: dict, pairs: list[tuple[str, object]]) -> dict:
    raw = copy.deepcopy(base)
    for key, value in pairs:
        apply_set(raw, key, value)
    parse_params(raw)  # every override checked before anything runs
    return raw


def _run(cmd: list[str]) -> int:
    """Run a step with its output on stderr (stdout carries the rows alone); say if it failed."""
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    code = subprocess.run(cmd, stdout=sys.stderr).returncode
    if code:
        print(f"error: {shlex.join(cmd)} exited {code}", file=sys.stderr)
    return code


def stage_commands(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, list[str]]:
    """Each stage's cmd from dvc.yaml, with `python` as this interpreter."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    except FileNotFoundError:
        raise ConfigError(f"{dvc_yaml}: not found; run from the project root") from None
    commands = {}
    for name, stage in stages.items():
        argv = shlex.split(stage["cmd"])
        commands[name] = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TABLE_MODELS), help="comma-separated")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="data.source for every run")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another -S override"
    )
    parser.add_argument("--runner", choices=("dvc", "stages"), default="dvc")
    parser.add_argument("--write", action="store_true", help=f"store each row in {ACCURACY.name}")
    parser.add_argument("--out", type=Path, help="also append each row to this file")
    args = parser.parse_args(argv)

    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODEL_INPUTS]
        if unknown or not models:
            raise ConfigError(
                f"--models: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(MODEL_INPUTS)}"
            )
        sets = [parse_set(s) for s in args.set]
        params_path = Path(PARAMS_FILE)
        try:
            original = params_path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{params_path}: not found; run from the project root") from None
        base = yaml.safe_load(original)
        runs = {m: overrides(args.source, m, sets) for m in models}
        resolved = {m: resolved_params(base, pairs) for m, pairs in runs.items()}
        stages = stage_commands() if args.runner == "stages" else {}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # `timeout` stops a run with SIGTERM: leave through the finally below all the same
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed: list[str] = []
    try:
        if args.runner == "stages":
            # data.* and features.* are the same for every model: prepare (and the features
            # the transfer models read) once, on the first model's params
            params_path.write_text(yaml.safe_dump(resolved[models[0]], sort_keys=False))
            once = ["prepare"] + ["features"] * any(MODEL_INPUTS[m] == "features" for m in models)
            if not all(_run(stages[name]) == 0 for name in once):
                failed = models
        for model in [] if failed else models:
            start = time.perf_counter()
            if args.runner == "dvc":
                steps = [[sys.executable, "-m", "dvc", "exp", "run", *set_args(runs[model])]]
            else:
                params_path.write_text(yaml.safe_dump(resolved[model], sort_keys=False))
                steps = [stages["train"], stages["evaluate"]]
            if not all(_run(step) == 0 for step in steps):
                failed.append(model)
                continue
            model_name, line = row(command(runs[model]))
            print(line, flush=True)
            print(f"{model}: {minutes(time.perf_counter() - start)}", file=sys.stderr)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")
            if args.write:
                store(model_name, line)
    finally:
        if args.runner == "stages":
            params_path.write_text(original)
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
