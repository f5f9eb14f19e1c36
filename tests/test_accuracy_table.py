"""bench/accuracy.py: the ACCURACY.md row of a finished run, replaced per model."""

import json

import pytest
import yaml

from bench.accuracy import BEGIN, END, main, upsert
from tests.conftest import ROOT


def test_upsert_replaces_the_models_row_and_keeps_the_others():
    text = upsert("", "mlp", "| mlp | 0.50 |")
    text = upsert(text, "simplecnn", "| simplecnn | 0.85 |")
    text = upsert(text, "mlp", "| mlp | 0.57 |")
    rows = text.split(BEGIN)[1].split(END)[0].strip().splitlines()
    assert rows == ["| simplecnn | 0.85 |", "| mlp | 0.57 |"]
    assert "| model | val acc (best) | test acc |" in text
    # a model whose name is a prefix of another's keeps the other's row
    text = upsert(text, "simplecnn", "| simplecnn | 0.86 |")
    assert "| mlp | 0.57 |" in text and "0.85" not in text


def test_row_reads_the_runs_metrics_and_resolved_recipe(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "simplecnn"
    raw["models"]["simplecnn"] = {
        **{"batch_size": 64, "lr": 0.05, "weight_decay": 0.0005, "optimizer": "sgd"},
        **{"scheduler": "onecycle", "label_smoothing": 0.1, "ema": 0.99, "crop_padding": 2},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text(
        json.dumps(
            {
                "val_acc": 0.8612,
                "params": 412234,
                "forward_mflops": 79.3,
                "epochs": 10,
            }
        )
    )
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"test_acc": 0.8544}))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_timing.json").write_text(json.dumps({"train_seconds": 1234.5}))
    monkeypatch.chdir(tmp_path)
    main(["--command", "dvc exp run -S model=simplecnn"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("| simplecnn | 0.8612 | 0.8544 | 10 | 412,234 | 79.3 | 20 min 34 s |")
    recipe = "sgd lr 0.05 wd 0.0005 onecycle bs 64 ls 0.1 ema 0.99 aug crop_flip pad 2"
    assert f"{recipe} tta flip_translate" in line
    assert line.endswith("| `dvc exp run -S model=simplecnn` |")


def test_row_names_the_recipe_keys_that_differ_from_the_defaults(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "airbench"
    raw["models"]["airbench"].update(lookahead=0.95, augment="crop_altflip", cutout=8)
    train = {"val_acc": 0.9, "params": 1972792, "forward_mflops": 236.3, "epochs": 10}
    timing = {"train_seconds": 60, "autocast": "bf16"}  # a run with train.amp_cpu on
    _write_run(tmp_path, raw, train, 0.9, timing)
    monkeypatch.chdir(tmp_path)
    main([])
    line = capsys.readouterr().out.strip()
    recipe = (
        "sgd lr 1.3 wd 0.00153 momentum 0.85 wd on norm/bias norm lr x64 triangle warm-up 2 ep "
        "bs 1024 ls 0.2 ema 0 lookahead 0.95 aug crop_altflip pad 2 reflect cutout 8 "
        "tta flip_translate "
        "bf16 autocast"
    )
    assert f"| {recipe} |" in line


@pytest.mark.parametrize("newton_schulz", ["fp32", "bf16"])
def test_row_names_muons_bf16_newton_schulz_only_when_the_run_used_it(
    newton_schulz, tmp_path, monkeypatch, capsys
):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "resnet9"  # its recipe is Muon's
    train = {"val_acc": 0.92, "params": 6573120, "forward_mflops": 758.5, "epochs": 10}
    timing = {"train_seconds": 60, "autocast": "bf16", "newton_schulz": newton_schulz}
    _write_run(tmp_path, raw, train, 0.91, timing)
    monkeypatch.chdir(tmp_path)
    main([])
    recipe = capsys.readouterr().out.strip().split(" | ")[7]
    assert recipe.startswith("muon lr 0.004 wd 0.05 onecycle")
    suffix = (
        "bf16 autocast muon NS bf16"
        if newton_schulz == "bf16"
        else "tta flip_translate bf16 autocast"
    )
    assert recipe.endswith(suffix)


@pytest.mark.parametrize(("momentum", "named"), [(0.95, ""), (0.9, " momentum 0.9")])
def test_row_names_muons_momentum_only_when_it_is_not_the_default(
    momentum, named, tmp_path, monkeypatch, capsys
):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "preactresnet18"
    raw["models"]["preactresnet18"]["muon_momentum"] = momentum
    train = {"val_acc": 0.92, "params": 11172170, "forward_mflops": 1110.8, "epochs": 10}
    _write_run(tmp_path, raw, train, 0.91, {"train_seconds": 60, "newton_schulz": "fp32"})
    monkeypatch.chdir(tmp_path)
    main([])
    recipe = capsys.readouterr().out.strip().split(" | ")[7]
    assert recipe.startswith(f"muon lr 0.004 wd 0.05{named} onecycle bs 128")


@pytest.mark.parametrize(
    ("model_args", "named"),
    [
        ({}, ""),
        ({"zero_init_residual": True}, " zero_init_residual true"),
        ({"use_bn": False, "zero_init_residual": True}, " use_bn false zero_init_residual true"),
    ],
)
def test_row_names_the_model_args_set_away_from_their_defaults(
    model_args, named, tmp_path, monkeypatch, capsys
):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "simpleresnet"
    raw["model_args"].update(model_args)
    train = {"val_acc": 0.91, "params": 1, "forward_mflops": 1.0, "epochs": 10}
    _write_run(tmp_path, raw, train, 0.9, {"train_seconds": 60})
    monkeypatch.chdir(tmp_path)
    main([])
    recipe = capsys.readouterr().out.strip().split(" | ")[7]
    # a run with zero-initialised residual branches (or no BatchNorm) says so in its row
    assert recipe.endswith(f"pad 2 reflect{named} tta flip_translate")


def _write_run(root, params: dict, train: dict, test_acc: float, timing: dict) -> None:
    """A finished run's params.yaml, metrics and timing log under ``root``."""
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(json.dumps(train))
    (root / "metrics" / "eval.json").write_text(json.dumps({"test_acc": test_acc}))
    (root / "logs").mkdir()
    (root / "logs" / "train_timing.json").write_text(json.dumps(timing))
