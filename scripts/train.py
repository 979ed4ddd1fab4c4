"""Train a GPT: `python scripts/train.py [group=option ...] [key=value ...]`.

The same as the installed command `gptlab-train`; see gptlab.cli.
"""

from gptlab.cli import train

if __name__ == "__main__":
    train()
