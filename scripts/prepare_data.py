"""Pre-tokenise a corpus: `python scripts/prepare_data.py data=<source> [num_proc=N] [out_dir=...]`.

The same as the installed command `gptlab-prepare`; see gptlab.cli.
"""

from gptlab.cli import prepare

if __name__ == "__main__":
    prepare()
