from pathlib import Path

import pytest
import yaml

from cvplay.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def real_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_holds_every_key_with_its_default():
    # dvc exp run -S only overrides keys that exist, so params.yaml must list them all.
    assert parse_params(real_params()).to_dict().keys() == Params().to_dict().keys()
    raw = real_params()
    for section, values in Params().to_dict().items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section
    assert load_params(ROOT / "params.yaml").model == "simplecnn"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda p: p.update(model="resnet1000"),
            "model: unknown choice 'resnet1000'; choose one of: ",
        ),
        (lambda p: p["train"].update(epochs="ten"), "train.epochs: expected int, got 'ten'"),
        (lambda p: p["train"].update(epoch=3), "train.epoch: unknown key; did you mean 'epochs'?"),
        (lambda p: p.update(modle="mlp"), "modle: unknown key; did you mean 'model'?"),
        (lambda p: p["train"].update(scheduler="cosine"), "choose one of: plateau, onecycle, none"),
        (lambda p: p["train"].update(lr=0), "train.lr: must be > 0"),
        (lambda p: p["train"].update(batch_size=0), "train.batch_size: must be >= 1"),
        (lambda p: p["model_args"].update(use_bn="yes"), "model_args.use_bn: expected bool"),
        (lambda p: p["data"].update(val_split=1.5), "data.val_split: must be a count"),
        (lambda p: p["train"].update(epochs=True), "train.epochs: expected int, got True"),
        (lambda p: p.update(train=[1, 2]), "train: expected a mapping"),
    ],
)
def test_bad_params_fail_with_a_message_naming_the_key(mutate, message):
    raw = real_params()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_choices_list_every_registered_model():
    raw = real_params()
    raw["model"] = "nope"
    with pytest.raises(
        ConfigError, match="minivgg, mlp, resnet18, resnet18_finetune, simplecnn, simpleresnet"
    ):
        parse_params(raw)


def test_ints_are_accepted_for_floats_and_fraction_val_split():
    raw = real_params()
    raw["train"]["lr"] = 1
    raw["data"]["val_split"] = 0.1
    params = parse_params(raw)
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.data.val_split == 0.1


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_params(bad)
