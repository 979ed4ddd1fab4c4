"""gptlab's tokenizers as Hugging Face files: `tokenizer.json` (built with the `tokenizers`
library) and `tokenizer_config.json`, which `AutoTokenizer.from_pretrained` loads offline.

The GPT-2 BPE is rebuilt from tiktoken's own ranks, so nothing is downloaded and the ids are
tiktoken's by construction. The char tokenizer becomes a word-level vocabulary over single
characters, each mapped to gptlab's id for it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.model.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (OpenAI's `bytes_to_unicode`): printable
    Latin-1 bytes stand for themselves, the others for code points 256 and up, in byte order.
    vocab.json and merges.txt spell tokens in these characters."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= {*range(ord("®"), ord("ÿ") + 1)}
    alphabet, stand_ins = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + stand_ins)
            stand_ins += 1
    return alphabet


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order (merges.txt).

    BPE on a token's own bytes, with only the merges ranked before the token, stops at the
    two parts whose merge is the token: tiktoken keeps ranks, not merges, and this recovers them.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            pairs = enumerate(itertools.pairwise(parts))
            best_rank, i = min((ranks.get(a + b, rank), i) for i, (a, b) in pairs)
            if best_rank >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two tokens")
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_tokenizer() -> tokenizers.Tokenizer:
    """OpenAI's GPT-2 BPE from tiktoken's ranks, `<|endoftext|>` a special token in text."""
    import tiktoken
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    encoding = tiktoken.get_encoding("gpt2")
    ranks = {token: encoding.encode_single_token(token) for token in encoding.token_byte_values()}
    alphabet = byte_level_alphabet()

    def spelled(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    vocab[GPT2Tokenizer.eot_text] = encoding.eot_token
    merges = [(spelled(a), spelled(b)) for a, b in bpe_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # ByteLevel splits text with GPT-2's own regular expression, the one tiktoken uses.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(GPT2Tokenizer.eot_text, special=True)])
    return tokenizer


def char_tokenizer(chars: str) -> tokenizers.Tokenizer:
    """One token per character, each with gptlab's id; a character outside the vocabulary is
    an error, as it is in gptlab (there is no unknown token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={ch: i for i, ch in enumerate(chars)}))
    # Every character its own piece, whitespace and newlines included.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join the characters, with no space between them
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, context_length: int, folder: Path) -> None:
    """`tokenizer.json` and `tokenizer_config.json` for gptlab's `tokenizer` into `folder`."""
    settings = {"model_max_length": context_length, "clean_up_tokenization_spaces": False}
    if isinstance(tokenizer, GPT2Tokenizer):
        built = gpt2_tokenizer()
        eot = GPT2Tokenizer.eot_text
        settings |= {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": eot,
            "eos_token": eot,
            "unk_token": eot,
            "add_prefix_space": False,
        }
    elif isinstance(tokenizer, CharTokenizer):
        built = char_tokenizer(tokenizer.chars)
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        raise TypeError(f"no Hugging Face form for the {tokenizer.name} tokenizer")
    built.save(str(folder / TOKENIZER_FILE))
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
