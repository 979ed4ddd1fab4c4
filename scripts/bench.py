"""Time a training step, Lightning against a plain loop: `python scripts/bench.py model=<config>`.

The same as the installed command `gptlab-bench`; see gptlab.cli.
"""

from gptlab.cli import bench

if __name__ == "__main__":
    bench()
