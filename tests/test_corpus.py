"""Corpora: CPython's docs, text files, sha256-pinned downloads, the hub offline."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import SHARED_DATA, needs_shared_data, script_env
from gptlab.data.corpus import CORPORA, CorpusSpec, DownloadableCorpus, fetch_corpus, sha256_of
from gptlab.errors import ConfigError


def test_pydocs_is_available_without_download() -> None:
    text = CorpusSpec(source="pydocs").text()
    assert len(text) > 400_000
    assert "lambda" in text


def test_text_files_glob_loads_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\nline two\n")
    (tmp_path / "b.txt").write_text("second file")
    text = CorpusSpec(source="text_files", path=str(tmp_path / "*.txt")).text()
    assert text == "first file\nline two\n\n\nsecond file"


def test_local_text_reads_as_the_prepared_path_reads_it(tmp_path: Path) -> None:
    """Training reads local files itself; scripts/prepare_data.py streams them through
    `datasets`: both must see the same text (a byte-order mark dropped, CRLF as LF)."""
    (tmp_path / "a.txt").write_bytes("\ufeffBOM first\r\nthen CRLF\r\n".encode())
    (tmp_path / "b.txt").write_bytes("naïve café\nno newline at the end".encode())
    spec = CorpusSpec(source="text_files", path=str(tmp_path / "*.txt"))
    assert spec.text() == "\n\n".join(spec.documents()["text"])
    assert spec.text().startswith("BOM first\nthen CRLF\n\n\nnaïve")


@pytest.mark.parametrize("source", ["pydocs", "text_files"])
def test_a_corpus_held_in_memory_does_not_import_datasets(tmp_path: Path, source: str) -> None:
    """`datasets` costs start-up (its import and an Arrow copy) that a text read into one
    string does not need."""
    (tmp_path / "a.txt").write_text("some text")
    code = (
        "import sys; from gptlab.data.corpus import CorpusSpec; "
        f"CorpusSpec(source={source!r}, path={str(tmp_path / 'a.txt')!r}).text(); "
        "assert 'datasets' not in sys.modules, 'datasets was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=script_env())


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothere.txt.*matches no file"):
        CorpusSpec(source="text_files", path=str(tmp_path / "nothere.txt")).text()


def test_empty_corpus_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        CorpusSpec(source="text_files", path=str(empty)).text()


@needs_shared_data
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_cached_corpus_with_the_right_hash_is_not_downloaded(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a verified cached corpus must not be downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = fetch_corpus(CORPORA[name], SHARED_DATA)
    assert sha256_of(path) == CORPORA[name].sha256


@needs_shared_data
def test_download_checks_the_hash(tmp_path: Path) -> None:
    source = SHARED_DATA / "the-verdict.txt"
    good = DownloadableCorpus(source.as_uri(), CORPORA["verdict"].sha256, "the-verdict.txt")
    path = fetch_corpus(good, tmp_path / "cache")
    assert path.read_bytes() == source.read_bytes()

    bad = DownloadableCorpus(source.as_uri(), "0" * 64, "corrupt.txt")
    with pytest.raises(ConfigError, match="expected 0000"):
        fetch_corpus(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "corrupt.txt").exists()
    assert os.listdir(tmp_path / "cache") == ["the-verdict.txt"]


def test_unreachable_download_says_where_to_put_the_file(tmp_path: Path) -> None:
    missing = DownloadableCorpus((tmp_path / "gone.txt").as_uri(), "0" * 64, "gone.txt")
    with pytest.raises(ConfigError, match="GPTLAB_DATA_DIR"):
        fetch_corpus(missing, tmp_path / "cache")
