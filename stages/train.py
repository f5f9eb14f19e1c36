"""DVC stage: train params.yaml's model; write models/{best,last}.pt, metrics and curves."""

from cvplay.config import load_params
from cvplay.errors import run_stage
from cvplay.train import run_train


def main() -> None:
    run_train(load_params())


if __name__ == "__main__":
    run_stage(main)
