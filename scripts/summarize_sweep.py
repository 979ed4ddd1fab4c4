"""Rank the runs of a sweep: `python scripts/summarize_sweep.py outputs/multirun/<date>/<time>`.

The same as the installed command `gptlab-summarize`; see gptlab.cli.
"""

from gptlab.cli import summarize

if __name__ == "__main__":
    summarize()
