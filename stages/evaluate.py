"""DVC stage: score models/best.pt on the test split; write metrics/eval.json and plots."""

from cvplay.config import load_params
from cvplay.errors import run_stage
from cvplay.evaluate import run_evaluate


def main() -> None:
    metrics = run_evaluate(load_params())
    print(f"test_acc {metrics['test_acc']:.4f}  test_loss {metrics['test_loss']:.4f}")


if __name__ == "__main__":
    run_stage(main)
