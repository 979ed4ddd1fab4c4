"""Pre-tokenise a corpus: `python scripts/prepare_data.py data=<source> [num_proc=N] [out_dir=...]`.

Writes tokens.bin (memory-mapped token ids) and meta.json; train on them with
`python scripts/train.py data=prepared data.dir=<out_dir>`.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import exit_on_config_error
from gptlab.prepared import CORPUS_KEYS, prepare_corpus


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    # Only the corpus keys: the loader keys of data/_base.yaml refer to a model config.
    corpus_data = OmegaConf.masked_copy(cfg.data, [key for key in CORPUS_KEYS if key in cfg.data])
    corpus_options = OmegaConf.to_container(corpus_data, resolve=True)
    out_dir = Path(cfg.out_dir).expanduser()
    metadata = prepare_corpus(corpus_options, cfg.tokenizer, out_dir, cfg.num_proc)
    print(
        f"Wrote {metadata['n_tokens']:,} tokens ({metadata['dtype']}) from "
        f"{metadata['n_documents']:,} documents to {out_dir}"
    )
    print(f"Train on them: python scripts/train.py data=prepared data.dir={out_dir}")


if __name__ == "__main__":
    main()
