"""Loss, perplexity and accuracy of a model on text: `python scripts/evaluate.py ckpt=last ...`.

The same as the installed command `gptlab-evaluate`; see gptlab.cli.
"""

from gptlab.cli import evaluate

if __name__ == "__main__":
    evaluate()
