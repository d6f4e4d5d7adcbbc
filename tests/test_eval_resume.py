"""An interrupted `luffy-fast eval` loses only the chunk under way, and `--resume` finishes it as
the uninterrupted eval would have (luffy_fast/eval_store.py): five problems, two samples each,
chunks of two problems (`--save-every 4`), from an engine whose answers depend on the seed it is
given, so that a chunk sampled with the wrong seed would score differently."""

from __future__ import annotations

import json
import re

import pytest

from luffy_fast import eval_cli
from luffy_fast.cli import main
from luffy_fast.evaluation import generate_and_score
from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams
from math_helpers import math_tokenizer, tiny_model_dir, write_jsonl

pytest.importorskip("math_verify")

DIGITS = (1, 2, 3, 4, 5)


def correct(seed: int, digit: int, sample: int) -> bool:
    return ((seed or 0) + digit + sample) % 3 != 0


class SeededEngine(RolloutEngine):
    """Answers problem d's sample j correctly when (seed + d + j) % 3 != 0; `stop_at` makes the
    call of that number (from 1) raise KeyboardInterrupt, as Ctrl-C would mid-generation."""

    def __init__(self, tokenizer, stop_at=None):
        self.tokenizer, self.stop_at, self.calls = tokenizer, stop_at, []

    def generate(self, prompts, n, params):
        digits = [int(self.tokenizer.decode(ids).split()[1]) for ids in prompts]  # "q d so"
        self.calls.append((digits, params.seed))
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        answers = [[f"</think> \\boxed{{{d if correct(params.seed, d, j) else 0}}} <eos>"
                    for j in range(n)] for d in digits]
        return [[Completion(ids, [0.0] * len(ids))
                 for ids in self.tokenizer(group).input_ids] for group in answers]

    def sync_weights(self, named_tensors):
        pass

    def close(self):
        pass


@pytest.fixture
def setup(tmp_path, monkeypatch):
    model = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "digits.jsonl", [{"problem": f"q {d}", "answer": str(d)}
                                                  for d in DIGITS])
    engines = []

    def eval_command(out, *extra, stop_at=None):
        def build(name, model_dir, tokenizer, args, max_model_len):
            engines.append(SeededEngine(tokenizer, stop_at))
            return engines[-1]

        monkeypatch.setattr(eval_cli, "build_engine", build)
        return main(["eval", "--model", str(model), "--data", str(data), "--n", "2", "--seed",
                     "7", "--engine", "hf", "--max-new-tokens", "8", "--save-every", "4",
                     "--output", str(out), "--reward-workers", "0", *extra])

    return eval_command, engines


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def without_time(out) -> dict:
    results = json.loads((out / "results.json").read_text())
    del results["settings"]["seconds"]
    return results


def progress(err: str) -> list[str]:
    """The problem counts of the eval's progress lines ("eval: 2/5 problems in ...")."""
    return re.findall(r"^eval: (\d+/\d+) problems in ", err, re.M)


def expected_rewards() -> list[float]:
    """Chunk k = problems 2k, 2k + 1 with seed 7 + k."""
    return [float(correct(7 + index // 2, d, j)) for index, d in enumerate(DIGITS)
            for j in range(2)]


def test_an_interrupted_eval_resumes_where_it_stopped(tmp_path, setup, capsys):
    eval_command, engines = setup
    assert eval_command(tmp_path / "whole") == 0
    assert engines[0].calls == [([1, 2], 7), ([3, 4], 8), ([5], 9)]
    assert progress(capsys.readouterr().err) == ["2/5", "4/5", "5/5"]  # problems, per chunk
    assert [r["reward"] for r in lines(tmp_path / "whole")] == expected_rewards()
    # by hand, (seed + d + j) % 3 != 0: seed 7: d=1: 8, 9; d=2: 9, 10 | seed 8: d=3: 11, 12;
    # d=4: 12, 13 | seed 9: d=5: 14, 15 -> avg@2 5 / 10; pass@2 1 (every problem once)
    assert expected_rewards() == [1, 0, 0, 1, 1, 0, 0, 1, 1, 0]
    assert without_time(tmp_path / "whole")["sources"]["digits"]["avg@2"] == pytest.approx(0.5)

    out = tmp_path / "stopped"
    assert eval_command(out, stop_at=2) == 130  # Ctrl-C while the second chunk generates
    assert "`--resume` with the same arguments keeps the problems done in" in capsys.readouterr().err
    assert [(r["problem"], r["sample"]) for r in lines(out)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not (out / "results.json").exists()

    assert eval_command(out, "--resume") == 0
    assert engines[-1].calls == [([3, 4], 8), ([5], 9)]  # only the chunks not done
    err = capsys.readouterr().err
    assert f"eval: resuming with 2 of 5 problems done ({out / 'generations.jsonl'})" in err
    assert progress(err) == ["4/5", "5/5"]  # counted from the problems done
    assert lines(out) == lines(tmp_path / "whole")
    assert without_time(out) == without_time(tmp_path / "whole")

    assert eval_command(out, "--resume") == 0  # a finished eval: nothing generated again
    assert engines[-1].calls == [] and without_time(out) == without_time(tmp_path / "whole")


def test_a_half_written_chunk_is_cut_and_generated_again(tmp_path, setup):
    eval_command, engines = setup
    out = tmp_path / "out"
    assert eval_command(out, stop_at=3) == 130
    text = (out / "generations.jsonl").read_text()
    rows = text.splitlines(keepends=True)
    assert len(rows) == 8
    # a crash while chunk 1 was written: one whole line of it and half of the next
    (out / "generations.jsonl").write_text("".join(rows[:5]) + rows[5][:20])
    with pytest.warns(RuntimeWarning, match="the last chunk was not written whole"):
        assert eval_command(out, "--resume") == 0
    assert engines[-1].calls == [([3, 4], 8), ([5], 9)]
    assert [r["reward"] for r in lines(out)] == expected_rewards()
    assert [(r["problem"], r["sample"]) for r in lines(out)] == [
        (p, j) for p in range(5) for j in range(2)]


@pytest.mark.parametrize("case, message", [
    ("again", "--output: '{out}' already holds an eval (eval_settings.json, generations.jsonl); "
              "pass --resume to continue it or --overwrite to replace it"),
    ("other_n", "--resume: the eval in '{out}' ran with other settings (n: 2 -> 1); resume it "
                "with its own, or pass --overwrite to start over"),
    ("other_data", "--resume: '{out}/generations.jsonl' line 1 is not a sample of these --data "
                   "(problem 0, 'digits', answer '1')"),
    ("no_output", "--resume: needs --output"),
    # other chunks: chunk 1 would be problems 1 and 2 with seed 8
    ("other_save_every", "--resume: the eval in '{out}' ran with other settings (save_every: 4 "
                         "-> 2); resume it with its own, or pass --overwrite to start over"),
])
def test_a_resume_that_would_mix_two_evals_is_refused_before_the_model_loads(
        tmp_path, setup, case, message, capsys, monkeypatch):
    eval_command, engines = setup
    out = tmp_path / "out"
    assert eval_command(out, stop_at=2) == 130
    before = (out / "generations.jsonl").read_text()
    capsys.readouterr()
    extra = {"again": [], "other_n": ["--resume", "--n", "1"], "other_data": ["--resume"],
             "no_output": ["--resume"], "other_save_every": ["--resume", "--save-every", "2"]}[case]
    if case == "other_data":  # the same file name, other answers
        write_jsonl(tmp_path / "digits.jsonl", [{"problem": f"q {d}", "answer": str(d + 1)}
                                                for d in DIGITS])
    argv_out = out
    if case == "no_output":
        monkeypatch.setattr(eval_cli, "check_window", lambda *args: None)
        argv = ["eval", "--model", str(tmp_path / "model"), "--data",
                str(tmp_path / "digits.jsonl"), "--resume"]
        assert main(argv) == 2
    else:
        assert eval_command(argv_out, *extra) == 2
    assert message.format(out=out) in capsys.readouterr().err
    assert len(engines) == 1  # no engine built after the first run
    assert (out / "generations.jsonl").read_text() == before


def test_without_output_the_eval_samples_the_same_chunks(tmp_path, setup, monkeypatch, capsys):
    """Nothing saved, but the same chunks and seeds: a command gives the same samples with or
    without --output (by hand in test_an_interrupted_eval_resumes_where_it_stopped: avg@2 5 / 10,
    pass@2 1), and no progress lines name a file."""
    engines = []
    monkeypatch.setattr(eval_cli, "build_engine", lambda name, model_dir, tokenizer, args, length:
                        engines.append(SeededEngine(tokenizer)) or engines[-1])
    assert main(["eval", "--model", str(tmp_path / "model"), "--data",
                 str(tmp_path / "digits.jsonl"), "--n", "2", "--seed", "7", "--engine", "hf",
                 "--max-new-tokens", "8", "--save-every", "4", "--reward-workers", "0"]) == 0
    assert engines[0].calls == [([1, 2], 7), ([3, 4], 8), ([5], 9)]
    captured = capsys.readouterr()
    assert progress(captured.err) == []
    digits = next(line for line in captured.out.splitlines() if line.startswith("digits"))
    assert digits.split()[-3:] == ["5", "50.0", "100.0"]  # problems, avg@2, pass@2 in percent


def test_overwrite_starts_the_eval_over(tmp_path, setup, capsys):
    eval_command, engines = setup
    out = tmp_path / "out"
    assert eval_command(out, stop_at=2) == 130
    with pytest.raises(SystemExit):  # argparse's exit 2
        eval_command(out, "--resume", "--overwrite")
    assert "(eval: the eval in --output)" in capsys.readouterr().err
    assert eval_command(out, "--overwrite") == 0
    assert engines[-1].calls == [([1, 2], 7), ([3, 4], 8), ([5], 9)]
    assert [r["reward"] for r in lines(out)] == expected_rewards()


def test_chunks_keep_their_problems_and_seeds_whatever_is_done():
    """generate_and_score by chunks: chunk k = problems [k * size, (k + 1) * size) sampled with
    seed + k; records carry the problems' indices among all; done chunks are not generated."""
    from luffy_fast.data import Sample

    tokenizer = math_tokenizer()
    problems = [Sample(prompt_ids=tokenizer(f"q {d} so").input_ids, ground_truth=str(d))
                for d in DIGITS]
    engine, saved = SeededEngine(tokenizer), []
    params = SamplingParams(max_new_tokens=4, seed=7)
    decode = tokenizer.decode
    records = generate_and_score(engine, problems, 2, params, decode,
                                 lambda items: [1.0] * len(items), per_chunk=2, save=saved.append)
    assert engine.calls == [([1, 2], 7), ([3, 4], 8), ([5], 9)]
    assert [[(r.problem, r.sample) for r in chunk] for chunk in saved] == [
        [(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1), (3, 0), (3, 1)], [(4, 0), (4, 1)]]
    done = {r.problem: [r] for r in records if r.problem in (2, 3) and r.sample == 0}
    for r in records:
        if r.problem in (2, 3) and r.sample == 1:
            done[r.problem].append(r)
    engine.calls.clear()
    again = generate_and_score(engine, problems, 2, params, decode,
                               lambda items: [1.0] * len(items), per_chunk=2, done=done)
    assert engine.calls == [([1, 2], 7), ([5], 9)]
    assert [(r.problem, r.sample) for r in again] == [(p, j) for p in range(5) for j in range(2)]
    engine.calls.clear()
    generate_and_score(engine, problems, 2, SamplingParams(max_new_tokens=4), decode,
                       lambda items: [1.0] * len(items), per_chunk=2)
    assert [seed for _, seed in engine.calls] == [None, None, None]  # unseeded stays unseeded


def test_a_folder_an_eval_is_writing_is_refused_to_a_second(tmp_path, setup, capsys):
    """Two evals appending to one generations.jsonl would interleave their chunks: while one
    holds --output (here this process holds its lock), a second exits 2 and touches nothing."""
    import os

    from luffy_fast.run_files import claim_run_dir

    eval_command, engines = setup
    out = tmp_path / "out"
    assert eval_command(out, stop_at=2) == 130
    before = (out / "generations.jsonl").read_text()
    capsys.readouterr()
    with claim_run_dir(out, key="--output"):
        assert eval_command(out, "--resume") == 2
    assert (f"--output: '{out}' is in use by another run (process {os.getpid()})"
            in capsys.readouterr().err)
    assert len(engines) == 1 and (out / "generations.jsonl").read_text() == before
    assert eval_command(out, "--resume") == 0  # released: the eval goes on
    assert [r["reward"] for r in lines(out)] == expected_rewards()
