"""luffy_fast/data_cache.py's entry file and key on samples built here: what an entry holds back,
what a failed write leaves, and which tokenizer changes make a new entry."""

from __future__ import annotations

import os

import numpy as np
import pytest

from luffy_fast import data_cache
from luffy_fast.data import DataReport, Sample
from luffy_fast.data_cache import read_entry, tokenizer_fingerprint, write_entry
from math_helpers import math_tokenizer


def test_an_entry_gives_back_the_samples_and_the_report(tmp_path):
    # ids up to a 152k vocabulary's last (Qwen2's 151935 does not fit in 16 bits); a sample
    # without traces between two with some, and one with two
    samples = [Sample([151935, 0], "1", [[7, 8, 1]], "digits", "d.jsonl:2"),
               Sample([65536], "0.5", [], "", "d.jsonl:3"),
               Sample([3], "x", [[151935], [2, 1]], "other", "d.jsonl:4")]
    report = DataReport("d.jsonl", rows=4, skipped_prompts=["d.jsonl:1"], truncated_traces=1,
                        prompt_lengths=[2, 1, 1], trace_lengths=[3, 9, 2])
    write_entry(tmp_path / "e.npz", samples, report)
    assert read_entry(tmp_path / "e.npz") == (samples, report)
    assert os.listdir(tmp_path) == ["e.npz"]  # the temporary name is gone


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError, match="No space left"):
        write_entry(tmp_path / "e.npz", [Sample([1], "1")], DataReport("d.jsonl"))
    assert os.listdir(tmp_path) == []


def test_the_fingerprint_changes_with_each_part_of_the_tokenizer():
    base = tokenizer_fingerprint(math_tokenizer())
    assert tokenizer_fingerprint(math_tokenizer()) == base  # the same tokenizer: the same entry
    other_eos = math_tokenizer()
    other_eos.eos_token = "</think>"  # a word of the vocabulary, now the end of a trace
    other_template = math_tokenizer(chat_template="{{ messages[0]['content'] }}")
    fingerprints = {tokenizer_fingerprint(t) for t in (other_eos, other_template)}
    assert base not in fingerprints and len(fingerprints) == 2


def test_the_cache_keeps_the_six_entries_last_used():
    assert data_cache.KEEP_ENTRIES == 6  # docs/reproduce.md
