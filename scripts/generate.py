"""Sample text from a checkpoint or GPT-2 weights: `python scripts/generate.py ckpt=last`.

The same as the installed command `gptlab-generate`; see gptlab.cli.
"""

from gptlab.cli import generate

if __name__ == "__main__":
    generate()
