"""Training data in the official layout from Parquet, JSONL and folders of shards: the limits
(skipped prompts, truncated traces) counted against rows built with known lengths
(tests/math_helpers.py), errors naming the file and row, and the on-disk tokenization cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from luffy_fast.data import DataLimits, load_samples, percentiles
from luffy_fast.data_cache import load_cached_samples
from luffy_fast.data_files import DataError
from luffy_fast.errors import ConfigError
from math_helpers import (
    LONG_TRACE_ROWS,
    SKIPPED_ROWS,
    math_rows,
    math_tokenizer,
    write_jsonl,
    write_parquet,
)

LIMITS = DataLimits(max_prompt_length=8, max_response_length=8)


@pytest.fixture
def tokenizer():
    return math_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_parquet_and_jsonl_give_the_same_samples_and_counts(tmp_path, tokenizer):
    rows = math_rows()
    from_jsonl, jsonl_report = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer,
                                            LIMITS)
    from_parquet, parquet_report = load_samples(write_parquet(tmp_path / "d.parquet", rows),
                                                tokenizer, LIMITS)
    kept = [i for i in range(20) if i not in SKIPPED_ROWS]
    for samples, report in ((from_jsonl, jsonl_report), (from_parquet, parquet_report)):
        assert len(samples) == 16 and report.rows == 20
        assert report.metrics() == {"data/prompts": 16, "data/skipped_prompts": 4,
                                    "data/truncated_traces": 4, "data/dropped_traces": 0,
                                    "data/prompts_without_trace": 0}
        for sample, i in zip(samples, kept):
            d = str(i % 10)
            assert sample.prompt_ids == ids(tokenizer, f"q {d} so")
            assert sample.ground_truth == d and sample.data_source == "digits"
            if i in LONG_TRACE_ROWS:  # EOS appended, then cut to 8: the EOS is gone
                assert sample.traces == [ids(tokenizer, " ".join([d] * 8))]
            else:
                assert sample.traces == [ids(tokenizer, f"{d} </think> \\boxed{{{d}}}")
                                         + [tokenizer.eos_token_id]]
        # trace lengths before the cut: 12 short (4 tokens) and 4 long (11 tokens)
        assert sorted(report.trace_lengths) == [4] * 12 + [11] * 4
        assert report.prompt_lengths == [3] * 16
    assert [s.prompt_ids for s in from_jsonl] == [s.prompt_ids for s in from_parquet]
    assert [s.traces for s in from_jsonl] == [s.traces for s in from_parquet]
    assert from_jsonl[0].where.endswith("d.jsonl:2") and from_parquet[0].where.endswith(
        "d.parquet row 1")


def test_drop_leaves_long_traces_out_and_names_the_bare_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    samples, report = load_samples(path, tokenizer, DataLimits(8, 8, "drop"))
    assert (report.truncated_traces, report.dropped_traces) == (0, 4)
    assert report.without_trace == [f"{path}:{i + 1}" for i in (3, 7, 11, 19)]
    assert [len(s.traces) for s in samples].count(0) == 4


def test_a_folder_of_shards_reads_in_name_order(tmp_path, tokenizer):
    rows = math_rows()
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", rows[:10])
    write_jsonl(folder / "part-1.jsonl", rows[10:])
    (folder / "README.txt").write_text("ignored")
    samples, report = load_samples(folder, tokenizer, LIMITS)
    single, _ = load_samples(write_jsonl(tmp_path / "all.jsonl", rows), tokenizer, LIMITS)
    assert report.rows == 20 and [s.traces for s in samples] == [s.traces for s in single]
    assert samples[-1].where == f"{folder / 'part-1.jsonl'}:10"


def test_percentiles_by_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "p100": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "p100": 7}
    assert percentiles([]) == {}
    # rank ceil(p / 100 x n), 1-based: with 10 values p99 is the 10th (9.9 rounds up), with 3
    # p50 the 2nd (1.5 rounds up); unsorted input is sorted first
    assert percentiles([10, 1, 2, 3, 4, 5, 6, 7, 8, 9]) == {"p50": 5, "p90": 9, "p99": 10, "p100": 10}
    assert percentiles([30, 10, 20], points=(50, 34)) == {"p50": 20, "p34": 20}


def test_the_report_names_each_count_in_its_place(tmp_path, tokenizer):
    # drop: rows 3, 7, 11, 19 lose their long trace and are kept bare; 0, 5, 10, 15 skipped
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    _, report = load_samples(path, tokenizer, DataLimits(8, 8, "drop"))
    assert report.summary() == (f"{path}: 20 rows, 16 prompts kept, 4 skipped (prompt too long), "
                                f"0 traces truncated, 4 dropped, 4 prompts without a trace")
    report.dropped_traces, report.without_trace = 2, ["a", "b", "c"]  # all counts apart
    assert report.summary().endswith("4 skipped (prompt too long), 0 traces truncated, "
                                     "2 dropped, 3 prompts without a trace")


def test_load_jsonl_samples_applies_the_overflow_and_refuses_no_rows(tmp_path, tokenizer):
    from luffy_fast.data import load_jsonl_samples

    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    dropped = load_jsonl_samples(path, tokenizer, 8, 8, trace_overflow="drop")
    assert [len(s.traces) for s in dropped].count(0) == 4  # the long traces left out
    cut = load_jsonl_samples(path, tokenizer, 8, 8)
    assert [len(s.traces) for s in cut].count(0) == 0 and len(cut) == 16
    with pytest.raises(DataError, match=rf"^{path}: no usable rows \(empty, or every prompt is "
                                        rf"longer than max_prompt_length=2\)"):
        load_jsonl_samples(path, tokenizer, 2, 8)  # "q d so" is 3 tokens


def test_a_missing_source_is_named_by_the_key_it_came_from(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"^data.heldout_source: the folder '{tmp_path / 'empty'}' "
                                        rf"holds no"):
        load_samples(tmp_path / "empty", tokenizer, LIMITS, key="data.heldout_source")


BAD_ROWS = [
    ({"target": "x", "reward_model": {"ground_truth": "1"}},
     r":1: the row has no 'prompt' \(columns found: reward_model, target\)"),
    ({"prompt": "q 1", "reward_model": "1"},
     r":1: 'reward_model' must be a mapping with a 'ground_truth' \(got a string '1'\)"),
    ({"prompt": "q 1", "reward_model": {"style": "rule"}},
     r":1: the row has no 'reward_model.ground_truth' \(reward_model keys found: style\)"),
    ({"prompt": "q 1", "reward_model": {"ground_truth": "  "}}, r":1 reward_model.ground_truth: "
                                                                 r"the ground truth is empty"),
    ({"prompt": "q 1", "reward_model": {"ground_truth": "1"},
      "target": {"role": "assistant", "content": ""}}, r":1 target\[0\]: the trace is empty"),
    ({"prompt": [{"content": "q 1"}], "reward_model": {"ground_truth": "1"}},
     r":1 prompt\[0\]: expected a message with 'role' and 'content' strings"),
    # rows that would train on the wrong text: a data frame's nested column written out through
    # str() or json.dumps, a NaN answer, a copied chat as the trace
    ({"prompt": "[{'role': 'user', 'content': 'q 1'}]", "reward_model": {"ground_truth": "1"}},
     r":1 prompt: a string holding chat messages as text"),
    ({"prompt": "q 1", "reward_model": {"ground_truth": "1"},
      "target": '[{"role": "assistant", "content": "1 </think> 1"}]'},
     r":1 target\[0\]: a string holding chat messages as text"),
    ({"prompt": "q 1", "reward_model": {"ground_truth": float("nan")}},
     r":1 reward_model.ground_truth: the ground truth is nan"),
    ({"prompt": "q 1", "reward_model": {"ground_truth": "1"},
      "target": [{"role": "user", "content": "q 1"}, {"role": "assistant", "content": "1"}]},
     r":1 target\[0\]: a trace is an assistant message, got role 'user'"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_name_the_file_and_line(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=f"{path}{message}"):
        load_samples(path, tokenizer, LIMITS)


def test_a_parquet_row_missing_a_field_names_the_row_and_the_columns(tmp_path, tokenizer):
    rows = math_rows(3)
    for row in rows:
        row["reward_model"] = {"answer": "1"}  # every row (Parquet columns are shared)
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=rf"{path} row 0: the row has no 'reward_model.ground_truth'"
                                        r" \(reward_model keys found: answer\)"):
        load_samples(path, tokenizer, LIMITS)
    renamed = [{"question": r["prompt"], "reward_model": {"ground_truth": "1"}} for r in rows]
    path = write_parquet(tmp_path / "e.parquet", renamed)
    with pytest.raises(DataError, match=rf"{path} row 0: the row has no 'prompt' \(columns found: "
                                        r"question, reward_model\)"):
        load_samples(path, tokenizer, LIMITS)
    assert issubclass(DataError, ConfigError)  # the command line reports it as a user error


@pytest.mark.parametrize("line, message", [
    (b"42\n", r":2: expected a JSON object with the row's fields, got a number \(42\)"),
    (b'"q 1"\n', r":2: expected a JSON object with the row's fields, got a string"),
    (b'{"prompt": "q \xff 1"}\n', r":2: not valid UTF-8 \(byte 15 of the line\)"),
    (b'{"prompt": "q 1", \n', r":2: not valid JSON"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "d.jsonl"
    good = b'{"prompt": "q 1", "reward_model": {"ground_truth": "1"}}\n'
    path.write_bytes(good + line + good)
    with pytest.raises(DataError, match=f"{path}{message}"):
        load_samples(path, tokenizer, LIMITS)


def test_unreadable_files_and_missing_paths(tmp_path, tokenizer):
    fake = tmp_path / "d.parquet"
    fake.write_text('{"prompt": "q 1"}\n')  # JSONL named .parquet: the old UnicodeDecodeError
    with pytest.raises(DataError, match=f"{fake}: not a readable Parquet file"):
        load_samples(fake, tokenizer, LIMITS)
    with pytest.raises(DataError, match="data.source: no such file or folder"):
        load_samples(tmp_path / "missing.jsonl", tokenizer, LIMITS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .parquet/.jsonl/.json files"):
        load_samples(tmp_path / "empty", tokenizer, LIMITS)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer\nq 1,1\n")  # was read as JSONL: ":1: not valid JSON"
    with pytest.raises(DataError, match=f"^data.source: '{csv}' is not a .parquet/.jsonl/.json file"):
        load_samples(csv, tokenizer, LIMITS)


def test_no_chat_template_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", math_rows(2))
    with pytest.raises(DataError, match="model.chat_template: the tokenizer has no chat template"):
        load_samples(path, math_tokenizer(chat_template=None), LIMITS)


def test_the_cache_is_read_back_and_rebuilt_when_an_input_changes(tmp_path, tokenizer,
                                                                   monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    cache = tmp_path / "cache"
    built, _ = load_cached_samples(path, tokenizer, LIMITS, cache)
    assert len(list(cache.glob("*.npz"))) == 1

    import luffy_fast.data_cache as data_cache

    def no_build(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_cache, "load_samples", no_build)
    again, report = load_cached_samples(path, tokenizer, LIMITS, cache)
    assert again == built and report.truncated_traces == 4 and len(report.skipped_prompts) == 4
    monkeypatch.undo()
    load_cached_samples(path, tokenizer, DataLimits(8, 9), cache)  # new limits: a new entry
    other = math_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    load_cached_samples(path, other, LIMITS, cache)  # another template: a new entry
    write_jsonl(path, math_rows(12))  # the file changes: a new entry
    smaller, _ = load_cached_samples(path, tokenizer, LIMITS, cache)
    assert len(list(cache.glob("*.npz"))) == 4 and len(smaller) == 9
    # a same-size edit that keeps the modification time (cp -p, rsync -a): a new entry too
    import os

    stat = os.stat(path)
    text = open(path).read()
    edited = text.replace('"ground_truth": "2"', '"ground_truth": "7"')
    assert edited != text and len(edited) == len(text)
    open(path, "w").write(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    truths = [s.ground_truth for s in load_cached_samples(path, tokenizer, LIMITS, cache)[0]]
    assert "7" in truths and "2" not in truths
    # a damaged entry is built again, with a warning naming it
    newest = max(cache.glob("*.npz"), key=lambda entry: entry.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="a damaged cache entry"):
        rebuilt, _ = load_cached_samples(path, tokenizer, LIMITS, cache)
    assert [s.ground_truth for s in rebuilt] == truths
    assert load_cached_samples(path, tokenizer, LIMITS, cache)[0] == rebuilt  # whole again


def test_a_cache_dir_that_cannot_be_a_folder_is_named(tmp_path, tokenizer):
    """data.cache_dir pointing at a file was a FileExistsError traceback."""
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    with pytest.raises(ConfigError, match=r"^data.cache_dir: '.*d.jsonl/cache' cannot be a "
                                          r"folder: '.*d.jsonl' is a file$"):
        load_cached_samples(path, tokenizer, LIMITS, path / "cache")


def test_the_cache_keeps_the_last_used_entries_and_drops_dead_writes(tmp_path, tokenizer,
                                                                    monkeypatch, capsys):
    """Whoever builds an entry removes all but the KEEP_ENTRIES last used, and temporary files
    whose writer is gone; an entry or write whose lock is held stays."""
    import os

    from filelock import FileLock

    import luffy_fast.data_cache as data_cache

    monkeypatch.setattr(data_cache, "KEEP_ENTRIES", 2)
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    cache = tmp_path / "cache"
    load_cached_samples(path, tokenizer, LIMITS, cache)
    [first] = cache.glob("*.npz")
    load_cached_samples(path, tokenizer, DataLimits(8, 9), cache)
    [second] = set(cache.glob("*.npz")) - {first}
    os.utime(first, ns=(1_000, 1_000))
    os.utime(second, ns=(2_000, 2_000))
    load_cached_samples(path, tokenizer, LIMITS, cache)  # a read: the first is the last used
    dead = cache / ".deadbeef.npz.tmp-123"  # a write that died: its lock is free
    dead.write_bytes(b"x" * 1000)
    live = cache / ".cafe.npz.tmp-456"  # a write under way: its lock is held
    live.write_bytes(b"x")
    with FileLock(str(cache / "cafe.lock")):
        load_cached_samples(path, tokenizer, DataLimits(9, 9), cache)  # built: prunes
    assert not second.exists() and not dead.exists() and first.exists() and live.exists()
    assert len(list(cache.glob("*.npz"))) == 2
    assert "removed 2 older entries and unfinished writes" in capsys.readouterr().err
    # an old entry whose lock is held (being read) stays, whatever its age
    os.utime(first, ns=(1_000, 1_000))
    with FileLock(str(first.with_suffix(".lock"))):
        load_cached_samples(path, tokenizer, DataLimits(9, 10), cache)
    assert first.exists() and len(list(cache.glob("*.npz"))) == 3


def test_concurrent_processes_tokenize_once(tmp_path, tokenizer):
    """Three "ranks" start together: one builds the entry, the others wait and read it."""
    path = write_jsonl(tmp_path / "d.jsonl", math_rows())
    tokenizer.save_pretrained(tmp_path / "tok")
    script = textwrap.dedent(f"""
        import luffy_fast.data_cache as data_cache
        from luffy_fast.data import DataLimits, load_tokenizer
        real = data_cache.load_samples
        def counted(*args, **kwargs):
            with open({str(tmp_path / 'builds')!r}, "a") as out:
                out.write("built\\n")
            return real(*args, **kwargs)
        data_cache.load_samples = counted
        samples, _ = data_cache.load_cached_samples({str(path)!r},
            load_tokenizer({str(tmp_path / 'tok')!r}), DataLimits(8, 8), {str(tmp_path / 'c')!r})
        print(len(samples), sum(len(t) for s in samples for t in s.traces))
    """)
    ranks = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [rank.communicate(timeout=300)[0].split() for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    # 16 prompts; traces: 12 x 4 tokens + 4 x 8 tokens (cut) = 80
    assert outputs == [["16", "80"]] * 3
    assert (tmp_path / "builds").read_text() == "built\n"


# --------------------------------------------------------------------------- evaluation files

def test_eval_problems_in_the_official_and_benchmark_layouts(tmp_path, tokenizer):
    from luffy_fast.eval_data import last_boxed, load_eval_problems

    official = write_jsonl(tmp_path / "valid.jsonl", [
        {"prompt": [{"role": "system", "content": "sys sys"}, {"role": "user", "content": "q 3"}],
         "reward_model": {"ground_truth": "3"}, "data_source": "aime",
         "target": [{"role": "assistant", "content": ""}]}])  # a trace evaluation never reads
    math500 = write_parquet(tmp_path / "math500.parquet", [
        {"problem": "q 4", "solution": "so \\boxed{\\frac{1}{2}} then \\boxed{4}", "level": 3},
        {"problem": "q 5", "answer": 5, "solution": "so \\boxed{5}"}])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q 6", "solution": "6 no box"}])
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"input": "q 7", "target": "7"}])

    [aime] = load_eval_problems(official, tokenizer)
    assert aime.prompt_ids == ids(tokenizer, "q 3 so")  # system prompt removed, model template
    assert (aime.ground_truth, aime.data_source) == ("3", "aime")
    first, second = load_eval_problems(math500, tokenizer)
    assert first.ground_truth == "4" and first.data_source == "math500"  # last \boxed{}
    assert second.ground_truth == "5"  # `answer` before `solution`
    # a solution with no \boxed{} would be graded as a whole text: refused
    with pytest.raises(DataError, match=rf"{gsm}:1 solution: no \\boxed\{{...\}} answer to "
                                        r"grade against; name the answer column"):
        load_eval_problems(gsm, tokenizer, data_source="gsm8k")
    with pytest.raises(DataError, match=rf"{custom}:1: no question column: expected 'prompt' with "
                                        r"'reward_model', or one of \['problem', 'question'\] "
                                        r"\(columns found: input, target\)"):
        load_eval_problems(custom, tokenizer)
    [mapped] = load_eval_problems(custom, tokenizer, question_key="input", answer_key="target")
    assert mapped.prompt_ids == ids(tokenizer, "q 7 so") and mapped.ground_truth == "7"
    assert last_boxed("a \\boxed{x^{2}} b") == "x^{2}" and last_boxed("none") is None


def test_benchmark_sources_are_named_by_their_folder_where_the_file_name_is_generic(tmp_path,
                                                                                     tokenizer):
    """The Hub's layouts: aime24/data/train-00000-of-00001.parquet is "aime24", MATH-500/test.jsonl
    "MATH-500" (they were all "train-00000-of-00001" or "test", merged in one row of the table);
    OlympiadBench's one-answer final_answer lists are its answers."""
    from luffy_fast.eval_data import load_eval_problems

    (tmp_path / "aime24" / "data").mkdir(parents=True)
    aime = write_parquet(tmp_path / "aime24" / "data" / "train-00000-of-00001.parquet",
                         [{"problem": "q 1", "answer": "1"}])
    (tmp_path / "MATH-500").mkdir()
    math500 = write_jsonl(tmp_path / "MATH-500" / "test.jsonl", [{"problem": "q 2", "answer": "2"}])
    olympiad = write_jsonl(tmp_path / "olympiad.jsonl", [
        {"question": "q 3", "solution": ["a long proof"], "final_answer": ["$\\frac{1}{2}$"]}])
    labels = [p.data_source for path in (aime, math500) for p in load_eval_problems(path, tokenizer)]
    assert labels == ["aime24", "MATH-500"]
    [problem] = load_eval_problems(olympiad, tokenizer)
    assert (problem.ground_truth, problem.data_source) == ("$\\frac{1}{2}$", "olympiad")


def test_a_generic_file_is_named_by_its_folder_from_any_working_directory(tmp_path, monkeypatch):
    """Run inside MATH-500/, `--data test.jsonl` was source "test"; in the Hub's cache a file
    was named after the snapshot's commit hash. A symlink is not followed (the Hub's files link
    to blobs named by their hash)."""
    from luffy_fast.eval_data import source_name

    (tmp_path / "MATH-500").mkdir()
    monkeypatch.chdir(tmp_path / "MATH-500")
    assert source_name(Path("test.jsonl")) == "MATH-500"
    snapshot = tmp_path / "datasets--HuggingFaceH4--MATH-500" / "snapshots" / ("0f" * 20)
    (snapshot / "data").mkdir(parents=True)
    blob = tmp_path / ("ab" * 32)
    blob.write_text("{}")
    (snapshot / "data" / "test-00000-of-00001.parquet").symlink_to(blob)
    assert source_name(snapshot / "data" / "test-00000-of-00001.parquet") == "MATH-500"
    assert source_name(Path("../aime24.parquet")) == "aime24"


def test_a_one_answer_list_is_its_answer(tmp_path, tokenizer):
    rows = math_rows(2)
    for row in rows:
        row["reward_model"]["ground_truth"] = [row["reward_model"]["ground_truth"]]
    samples, _ = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, LIMITS)
    assert [s.ground_truth for s in samples] == ["1"]  # row 0 is skipped (prompt too long)


def test_folders_refuse_what_they_cannot_read_and_skip_metadata(tmp_path, tokenizer):
    import gzip

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", math_rows(4))
    (folder / "dataset_info.json").write_text('{\n  "features": {}\n}\n')  # datasets' metadata
    assert len(load_samples(folder, tokenizer, LIMITS)[0]) == 3  # read, metadata left alone
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))  # was skipped without a word
    with pytest.raises(DataError, match=r"holds files that are not read \(b.jsonl.gz\): only "
                                        r"uncompressed .parquet/.jsonl/.json files are"):
        load_samples(folder, tokenizer, LIMITS)
    single = tmp_path / "one.json"
    single.write_text('{\n  "data": []\n}\n')
    with pytest.raises(DataError, match=r"one.json:1: not valid JSON .*a .json file holds a JSON "
                                        r"array of row objects, or one object per line"):
        load_samples(single, tokenizer, LIMITS)


def test_damage_inside_a_parquet_file_names_the_file(tmp_path, tokenizer):
    """A file whose footer is whole but whose pages are not: pyarrow fails while reading rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = math_rows(20)
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
    data = bytearray(path.read_bytes())
    pages_end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # the footer's start
    start = 4 + (pages_end - 4) // 5
    data[start:start + 64] = bytes(64)  # zeros inside the pages, the footer whole
    path.write_bytes(bytes(data))
    pq.ParquetFile(path)  # opens
    with pytest.raises(DataError, match=rf"{path}: not a readable Parquet file: the rows from "
                                        r"row 0 on cannot be read"):
        load_samples(path, tokenizer, LIMITS)


class CallLog:
    """A tokenizer that records what each call tokenizes (a text or a batch of texts)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, **kwargs):
        self.calls.append(text)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_eval_prompts_are_tokenized_in_batches_as_row_by_row(tmp_path, tokenizer, monkeypatch):
    from luffy_fast import data
    from luffy_fast.eval_data import load_eval_problems

    questions = ["q 1", "q 2 3", "q 4 5 6", "sys q", "q 7 8 9 0"]
    path = write_jsonl(tmp_path / "amc.jsonl", [{"problem": q, "answer": str(i)}
                                                for i, q in enumerate(questions)])
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 2)  # 5 prompts: batches of 2, 2 and 1
    logged = CallLog(tokenizer)
    problems = load_eval_problems(path, logged)
    texts = [f"{q} so " for q in questions]  # the template: each message, then "so "
    assert logged.calls == [texts[0:2], texts[2:4], texts[4:]]
    row_by_row = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    # the word ids (tests/math_helpers.py WORDS): q 3, so 4, sys 5, digit d at 6 + d
    assert row_by_row[1] == [3, 8, 9, 4] and row_by_row[3] == [5, 3, 4]
    assert [p.prompt_ids for p in problems] == row_by_row
    assert [(p.ground_truth, p.data_source, p.traces, p.where) for p in problems] == [
        (str(i), "amc", [], f"{path}:{i + 1}") for i in range(5)]


def test_a_tokenizer_saved_by_transformers_4_loads_as_saved(tmp_path):
    """transformers 4 names a generic tokenizer "PreTrainedTokenizerFast" (5: "TokenizersBackend");
    beside a Qwen2 config, AutoTokenizer would load Qwen2's own class over its tokenizer.json."""
    import json

    from luffy_fast.data import load_tokenizer
    from luffy_fast.toy.model import TinyQwen2Config, build_policy

    tokenizer = math_tokenizer()
    build_policy(tokenizer, TinyQwen2Config(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1), seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    # math_helpers.WORDS: "3" is id 9, "</think>" 2, "\\boxed{3}" 19
    assert load_tokenizer(tmp_path)("3 </think> \\boxed{3}").input_ids == [9, 2, 19]
