"""Loss, perplexity and next-token accuracy of a model on text.

`python scripts/evaluate.py ckpt=last text_file=notes.txt show_tokens=20`, or on a
training config's split: `python scripts/evaluate.py pretrained=gpt2 data=verdict`.
"""

import hydra
from omegaconf import DictConfig

from gptlab.cli import exit_on_config_error
from gptlab.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
