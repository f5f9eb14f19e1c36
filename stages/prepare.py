"""DVC stage: data.source -> data/{train,test}/<class>/*.png + data/packed/*.pt."""

from cvplay.config import load_params
from cvplay.errors import run_stage
from cvplay.prepare import default_workers, prepare


def main() -> None:
    params = load_params()
    report = prepare(
        params.data.source, max_per_class=params.data.max_per_class, workers=default_workers()
    )
    print(f"prepared {report['train']['images']} train / {report['test']['images']} test images")


if __name__ == "__main__":
    run_stage(main)
