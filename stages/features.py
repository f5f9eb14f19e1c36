"""DVC stage: frozen ResNet18 stem..layer3 features of the prepared images -> data/features/."""

from cvplay.config import load_params
from cvplay.engine import pick_device
from cvplay.errors import run_stage
from cvplay.transfer import run_features


def main() -> None:
    shapes = run_features(load_params().features, pick_device())
    print(f"features: train {shapes['train']}, test {shapes['test']} (fp16)")


if __name__ == "__main__":
    run_stage(main)
