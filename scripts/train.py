"""Train a GPT: `python scripts/train.py [group=option ...] [key=value ...]`.

Returns the best val loss, which Hydra sweepers minimise.
"""

import hydra
from omegaconf import DictConfig

from gptlab.cli import exit_on_config_error
from gptlab.distributed import sweep_job
from gptlab.train import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@exit_on_config_error
def main(cfg: DictConfig) -> float:
    # In a -m sweep with strategy=ddp, each job's child ranks run that job only.
    with sweep_job():
        return run(cfg)


if __name__ == "__main__":
    main()
