"""DVC stage: train params.yaml's model; write models/{best,last}.pt, metrics and curves.

With train.nproc > 1 the stage re-launches itself under torchrun (one process per rank).
"""

import sys

from cvplay.config import load_params
from cvplay.distributed import launch_torchrun, under_torchrun
from cvplay.errors import run_stage
from cvplay.train import run_train


def main() -> None:
    params = load_params()
    if params.train.nproc > 1 and not under_torchrun():
        sys.exit(launch_torchrun(params.train.nproc, "stages.train"))
    run_train(params)


if __name__ == "__main__":
    run_stage(main)
