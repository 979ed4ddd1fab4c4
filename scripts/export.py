"""Write a checkpoint as a Hugging Face folder: `python scripts/export.py ckpt=best out=<dir>`.

The same as the installed command `gptlab-export`; see gptlab.cli.
"""

from gptlab.cli import export

if __name__ == "__main__":
    export()
