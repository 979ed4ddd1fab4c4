"""Corpora: CPython's docs, text files, sha256-pinned downloads, the hub offline."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

from conftest import SHARED_DATA, needs_shared_data
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
