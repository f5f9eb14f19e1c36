"""DVC stage: data.source -> data/{train,test}/<class>/*.png + data/packed/*.pt."""

from cvplay.config import load_params
from cvplay.errors import run_stage
from cvplay.prepare import default_workers, prepare


def main() -> None:
    params = load_params()
    d = params.data
    report = prepare(
        d.source,
        max_per_class=d.max_per_class,
        image_size=d.image_size,
        on_bad_image=d.on_bad_image,
        workers=default_workers(),
    )
    skipped = len(report["train"]["skipped"]) + len(report["test"]["skipped"])
    print(
        f"prepared {report['train']['images']} train / {report['test']['images']} test images"
        + (f" (bad images skipped: {skipped}; see data/prepare_report.json)" if skipped else "")
    )


if __name__ == "__main__":
    run_stage(main)
