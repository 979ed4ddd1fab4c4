"""Rank the runs of a sweep: `python scripts/summarize_sweep.py outputs/multirun/<date>/<time>`.

Writes summary.csv, summary.md and summary.png into that directory (multiruns also do this
themselves after every job) and prints the table.
"""

import argparse
from pathlib import Path

from gptlab.cli import exit_on_config_error
from gptlab.sweep import write_summary


@exit_on_config_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    args = parser.parse_args()
    csv_path, md_path, png_path = write_summary(args.sweep_dir)
    print(md_path.read_text())
    print(f"Wrote {csv_path}, {md_path} and {png_path}")


if __name__ == "__main__":
    main()
