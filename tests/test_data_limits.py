"""tokenize_records with a character-level tokenizer (one id per character: ord(c); EOS = 0),
so every length below is a count of characters: the prompt and trace limits at their
boundaries, EOS then cut, and the "<think>\\n" prefix of a trace."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from luffy_fast.data import DataLimits, tokenize_records
from luffy_fast.data_files import DataError, Record


class CharTokenizer:
    """The prompt is the user's text then `generation` (the chat template's generation prompt)."""

    chat_template = "characters"

    def __init__(self, generation: str = "", eos_token_id=0) -> None:
        self.generation, self.eos_token_id = generation, eos_token_id

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(m["content"] for m in messages) + self.generation

    def __call__(self, texts, add_special_tokens):
        return SimpleNamespace(input_ids=[[ord(c) for c in text] for text in texts])


def record(prompt: str, *traces: str) -> Record:
    return Record([{"role": "user", "content": prompt}], list(traces), "1", "d", f"row {prompt}")


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_prompt_of_exactly_the_limit_is_kept_and_one_longer_is_skipped():
    records = [record("abcd", "x"), record("abcde", "y")]  # 4 and 5 characters, limit 4
    samples, report = tokenize_records(records, CharTokenizer(), DataLimits(4, 8))
    assert [s.prompt_ids for s in samples] == [chars("abcd")]
    assert report.skipped_prompts == ["row abcde"] and report.prompt_lengths == [4]


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_a_trace_of_exactly_the_limit_with_its_eos_is_neither_cut_nor_dropped(overflow):
    # limit 4: "abc" + EOS = 4 tokens fits as is; "abcd" + EOS = 5 is cut to "abcd" (no EOS
    # left) or dropped
    samples, report = tokenize_records([record("p", "abc", "abcd")], CharTokenizer(),
                                       DataLimits(8, 4, overflow))
    cut = [chars("abcd")] if overflow == "truncate" else []
    assert samples[0].traces == [chars("abc") + [0], *cut]
    assert report.trace_lengths == [4, 5]
    assert (report.truncated_traces, report.dropped_traces) == (
        (1, 0) if overflow == "truncate" else (0, 1))


def test_the_think_prefix_of_a_trace_is_dropped_whole_and_only_when_both_have_it():
    traces = ("<think>\nab", "ab <think>\n")  # with the prefix; with it elsewhere only
    # the prompt opens the reasoning: the first trace loses exactly its 8 characters
    # ("<think>" and the newline), the second keeps all of its 11
    opened, _ = tokenize_records([record("q", *traces)], CharTokenizer("<think>\n"),
                                 DataLimits(16, 16))
    assert opened[0].traces == [chars("ab") + [0], chars("ab <think>\n") + [0]]
    # the prompt does not open it: both traces are kept whole
    plain, _ = tokenize_records([record("q", *traces)], CharTokenizer(), DataLimits(16, 16))
    assert plain[0].traces == [chars("<think>\nab") + [0], chars("ab <think>\n") + [0]]


def test_a_tokenizer_without_eos_is_refused():
    with pytest.raises(DataError, match="no EOS token"):
        tokenize_records([record("q", "a")], CharTokenizer(eos_token_id=None), DataLimits(8, 8))


class BosTokenizer(CharTokenizer):
    """Adds a BOS (id 1) in front when asked for special tokens, as Llama's tokenizer does."""

    def __call__(self, texts, add_special_tokens):
        out = super().__call__(texts, add_special_tokens)
        return SimpleNamespace(input_ids=[[1] * add_special_tokens + ids for ids in out.input_ids])


def test_no_special_tokens_are_added_to_the_rendered_prompt_or_the_trace():
    # the chat template writes the prompt's special tokens; a trace continues the prompt
    [sample], _ = tokenize_records([record("ab", "cd")], BosTokenizer(), DataLimits(8, 8))
    assert (sample.prompt_ids, sample.traces) == (chars("ab"), [chars("cd") + [0]])
