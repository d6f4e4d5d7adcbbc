"""`luffy-fast eval` end to end: two evaluation files (the official layout with a system prompt,
and a problem/answer benchmark layout), n = 4 samples per problem from a scripted generator,
scored by math-verify; the printed table, results.json and generations.jsonl against values
worked by hand. Then the real transformers engine on a tiny model, and the input errors."""

from __future__ import annotations

import json
import warnings

import pytest

from luffy_fast import eval_cli
from luffy_fast.cli import main
from luffy_fast.rollout.base import Completion, RolloutEngine
from luffy_fast.toy.model import TinyQwen2Config, build_policy
from math_helpers import math_tokenizer

pytest.importorskip("math_verify")
@pytest.fixture
def model_dir(tmp_path):
    tokenizer = math_tokenizer()
    policy = build_policy(tokenizer, TinyQwen2Config(hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     num_key_value_heads=1), seed=0)
    directory = tmp_path / "model"
    policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def eval_files(tmp_path):
    # official layout: the system prompt "sys sys" must not reach the model
    official = write_jsonl(tmp_path / "official.jsonl", [
        {"prompt": [{"role": "system", "content": "sys sys"}, {"role": "user", "content": f"q {d}"}],
         "reward_model": {"ground_truth": str(d)}, "data_source": "aime", "extra": 1}
        for d in (1, 2)])
    # a benchmark layout: problem / answer, the data source is the file's name
    benchmark = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": f"q {d}", "answer": str(d)} for d in (3, 4)])
    return official, benchmark


# Per problem (its digit d), the 4 scripted responses: "ok" = "</think> \boxed{d}" (correct),
# "bad" = "</think> \boxed{0}" (wrong), "open" = "\boxed{d}" without </think> (format: 0).
SCRIPT = {1: ["ok", "bad", "bad", "open"],   # aime: 1 of 4
          2: ["ok", "ok", "ok", "bad"],      # aime: 3 of 4
          3: ["ok", "ok", "ok", "ok"],       # math500: 4 of 4
          4: ["open", "bad", "bad", "bad"]}  # math500: 0 of 4


class ScriptedEngine(RolloutEngine):
    def __init__(self, tokenizer):
        self.tokenizer, self.prompts, self.params = tokenizer, [], []

    def generate(self, prompts, n, params):
        self.params.append(params)
        completions = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            digit = int(text.split()[1])  # "q d so"
            responses = {"ok": f"</think> \\boxed{{{digit}}}", "bad": "</think> \\boxed{0}",
                         "open": f"\\boxed{{{digit}}}"}
            token_ids = [self.tokenizer(responses[kind] + " <eos>").input_ids
                         for kind in SCRIPT[digit][:n]]
            completions.append([Completion(ids, [0.0] * len(ids)) for ids in token_ids])
        return completions

    def sync_weights(self, named_tensors):
        pass

    def close(self):
        pass


def test_eval_two_sources_n4_by_hand(tmp_path, model_dir, eval_files, monkeypatch, capsys):
    engines = []

    def scripted(name, model, tokenizer, args, max_model_len):
        assert name == "hf"
        engines.append(ScriptedEngine(tokenizer))
        return engines[-1]

    monkeypatch.setattr(eval_cli, "build_engine", scripted)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # within the model's window: no warning
        assert main(["eval", "--model", str(model_dir), "--data", *eval_files, "--n", "4",
                     "--temperature", "0.6", "--max-new-tokens", "8", "--engine", "hf",
                     "--output", str(out), "--reward-workers", "0"]) == 0
    # the official prompt handling: system prompt removed, the model's chat template applied
    assert engines[0].prompts == ["q 1 so", "q 2 so", "q 3 so", "q 4 so"]
    results = json.loads((out / "results.json").read_text())
    aime, math500 = results["sources"]["aime"], results["sources"]["math500"]
    # avg@4: aime (1/4 + 3/4) / 2 = 0.5; math500 (4/4 + 0/4) / 2 = 0.5
    assert aime["avg@4"] == pytest.approx(0.5) and math500["avg@4"] == pytest.approx(0.5)
    # pass@1 = avg@4; pass@2 = 1 - C(4-c, 2)/C(4, 2): c=1: 1 - 3/6 = 0.5; c=3: 1 - 0/6 = 1;
    # aime (0.5 + 1) / 2 = 0.75; math500 c=4: 1, c=0: 0 -> 0.5
    assert aime["pass@2"] == pytest.approx(0.75) and math500["pass@2"] == pytest.approx(0.5)
    # pass@4: aime both problems solved once -> 1; math500 one of two -> 0.5
    assert aime["pass@4"] == pytest.approx(1.0) and math500["pass@4"] == pytest.approx(0.5)
    # macro: avg@4 (0.5 + 0.5) / 2 = 0.5; pass@4 (1 + 0.5) / 2 = 0.75
    assert results["macro"]["avg@4"] == pytest.approx(0.5)
    assert results["macro"]["pass@4"] == pytest.approx(0.75)
    assert results["settings"]["n"] == 4 and results["settings"]["temperature"] == 0.6
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 16
    assert [r["reward"] for r in lines if r["data_source"] == "aime"] == [1, 0, 0, 0, 1, 1, 1, 0]
    # the responses as generated, special tokens included (skip_special_tokens=False)
    assert [r["response"] for r in lines[:4]] == ["</think> \\boxed{1} <eos>",
                                                  "</think> \\boxed{0} <eos>",
                                                  "</think> \\boxed{0} <eos>", "\\boxed{1} <eos>"]
    table = capsys.readouterr().out
    assert "aime" in table and "math500" in table
    macro_row = next(line for line in table.splitlines() if line.startswith("macro average"))
    assert macro_row.split()[-2:] == ["50.0", "75.0"]  # avg@4, pass@4 in percent


def test_one_table_of_several_runs_is_the_papers_avg_column(tmp_path, model_dir, eval_files,
                                                           monkeypatch, capsys):
    """avg@32 for AIME and pass@1 for MATH-500 take two runs (one --n each), and nothing joined
    their results: `table` gives each source's avg@n at its run's n and the macro over all.
    --source names a benchmark split over files as one."""
    monkeypatch.setattr(eval_cli, "build_engine",
                        lambda name, model, tokenizer, args, length: ScriptedEngine(tokenizer))
    common = ["--model", str(model_dir), "--temperature", "0.6", "--max-new-tokens", "8",
              "--engine", "hf", "--reward-workers", "0"]
    assert main(["eval", *common, "--data", eval_files[0], "--n", "4",
                 "--output", str(tmp_path / "aime")]) == 0
    assert main(["eval", *common, "--data", eval_files[1], "--n", "1", "--source", "MATH-500",
                 "--output", str(tmp_path / "math")]) == 0
    math = json.loads((tmp_path / "math" / "results.json").read_text())
    assert list(math["sources"]) == ["MATH-500"] and math["settings"]["batch_size"] == 64
    capsys.readouterr()
    assert main(["table", str(tmp_path / "aime"), str(tmp_path / "math" / "results.json")]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    # aime avg@4 0.5 (by hand above); MATH-500 avg@1: its first response per problem,
    # problem 3 correct, problem 4 wrong -> 0.5; the macro over the two sources
    expected = 100 * (0.5 + math["sources"]["MATH-500"]["avg@1"]) / 2
    assert rows["aime"] == ["2", "4", "50.0"] and rows["MATH-500"][:2] == ["2", "1"]
    assert rows["macro"] == ["average", f"{expected:.1f}"]
    (tmp_path / "empty.json").write_text(json.dumps({"n": 4, "sources": {}}))
    (tmp_path / "no_count.json").write_text(json.dumps({"n": 4, "sources": {"aime": {"avg@4": 1}}}))
    for bad, message in (([str(tmp_path / "empty.json")], "is not an eval results.json"),
                         ([str(tmp_path / "no_count.json")], "is not an eval results.json"),
                         ([str(tmp_path / "aime"), str(tmp_path / "aime")],
                          "table: source 'aime' is in both"),
                         ([str(tmp_path / "nowhere")], "table: no results.json at"),
                         ([str(eval_files[0])], "is not an eval results.json")):
        assert main(["table", *bad]) == 2
        assert message in capsys.readouterr().err


def test_the_sampling_settings_reach_the_engine(tmp_path, model_dir, eval_files, monkeypatch):
    """--max-new-tokens, --temperature (0: greedy is allowed), --top-p and --seed are the
    engine's SamplingParams, one call for every problem."""
    from luffy_fast.rollout.base import SamplingParams

    engines = []
    monkeypatch.setattr(eval_cli, "build_engine", lambda name, model, tokenizer, args, length:
                        engines.append(ScriptedEngine(tokenizer)) or engines[-1])
    assert main(["eval", "--model", str(model_dir), "--data", eval_files[1], "--n", "2",
                 "--temperature", "0", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "8",
                 "--reward-workers", "0", "--engine", "hf"]) == 0
    assert engines[0].params == [SamplingParams(8, temperature=0.0, top_p=0.9, seed=3)]


def test_the_hf_engine_over_the_model_directory(model_dir):
    """--batch-size is the engine's batch; fp32 weights on the CPU; pad and EOS the tokenizer's."""
    import argparse

    import torch

    tokenizer = math_tokenizer()
    args = argparse.Namespace(batch_size=3, tensor_parallel_size=1, seed=0)
    engine = eval_cli.build_engine("hf", str(model_dir), tokenizer, args, 64)
    assert (engine.max_batch_size, engine.pad_token_id, engine.eos_token_id) == (3, 0, 1)
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}


def test_eval_with_the_transformers_engine(tmp_path, model_dir, eval_files):
    """A real tiny model samples; the written summary is the records' own avg@2."""
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--data", eval_files[1], "--n", "2",
                 "--max-new-tokens", "4", "--engine", "hf", "--output", str(out),
                 "--reward-workers", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and results["settings"]["engine"] == "hf"
    per_problem = [sum(r["reward"] for r in lines if r["problem"] == p) / 2 for p in (0, 1)]
    assert results["sources"]["math500"]["avg@2"] == pytest.approx(sum(per_problem) / 2)


@pytest.mark.parametrize("case, message", [
    ("no_model", "--model"), ("no_data", "--data: no such file"), ("bad_n", "--n"),
    ("bad_row", "bad.jsonl:1"), ("output_is_a_file", "--output: "),
    ("nan_temperature", "--temperature must be a finite number"), ("no_batch", "--batch-size"),
    ("no_template_file", "--chat-template: no such file"),
    ("checkpoint_folder", "a checkpoint's model is in its hf/ folder: --model "),
    ("broken_template", "line 1: unexpected '}' (a Jinja syntax error)"),
    ("no_chat_template", "has no chat template; pass --chat-template FILE"),
    ("infinite_reward_timeout",
     "--reward-timeout: must be a positive number of seconds, at most 86400 (got inf)"),
    ("huge_seed", "--seed: must be in [0, 2**63) with the hf engine (got 99999999999999999999999)"),
    ("vllm_seed", "--seed: must be in [0, 2**32) with the vllm engine (got 4294967296)"),
    ("no_new_tokens", "--max-new-tokens: must be at least 1 (got 0)"),
    ("zero_top_p", "--temperature must be a finite number >= 0 and --top-p in (0, 1] (got 0.6, 0.0)"),
    ("no_tensor_parallel", "--tensor-parallel-size: must be at least 1 (got 0)"),
    ("negative_reward_workers", "--reward-workers: must be >= 0 (got -1)"),
    ("zero_reward_timeout",
     "--reward-timeout: must be a positive number of seconds, at most 86400 (got 0.0)"),
    ("negative_seed", "--seed: must be in [0, 2**63) with the hf engine (got -1)"),
    ("zero_save_every", "--save-every: must be at least 1 (got 0)"),
    ("overwrite_without_output", "--overwrite: needs --output (the folder of the eval's files)"),
])
def test_bad_input_is_reported_before_the_model_loads(tmp_path, model_dir, eval_files, case,
                                                      message, monkeypatch, capsys):
    def never(*args):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(eval_cli, "build_engine", never)
    model, data, n, extra = str(model_dir), list(eval_files), "2", []
    if case == "no_model":
        model = str(tmp_path / "missing")
    elif case == "no_data":
        data = [str(tmp_path / "missing.jsonl")]
    elif case == "bad_n":
        n = "0"
    elif case == "output_is_a_file":
        extra = ["--output", eval_files[0]]  # results would fail to be written after the run
    elif case == "nan_temperature":
        extra = ["--temperature", "nan"]
    elif case == "no_batch":
        extra = ["--batch-size", "0"]
    elif case == "huge_seed":  # "Overflow when unpacking long long" from torch.manual_seed before
        extra = ["--seed", "99999999999999999999999", "--engine", "hf"]
    elif case == "vllm_seed":  # vLLM's workers seed numpy with it
        extra = ["--seed", str(2**32), "--engine", "vllm"]
    elif case in ("no_new_tokens", "zero_top_p", "no_tensor_parallel", "negative_reward_workers",
                  "zero_reward_timeout"):
        extra = {"no_new_tokens": ["--max-new-tokens", "0"], "zero_top_p": ["--top-p", "0"],
                 "no_tensor_parallel": ["--tensor-parallel-size", "0"],
                 "negative_reward_workers": ["--reward-workers", "-1"],
                 "zero_reward_timeout": ["--reward-timeout", "0"]}[case]
    elif case == "negative_seed":
        extra = ["--seed", "-1", "--engine", "hf"]
    elif case == "zero_save_every":
        extra = ["--save-every", "0", "--output", str(tmp_path / "out")]
    elif case == "overwrite_without_output":
        extra = ["--overwrite"]
    elif case == "infinite_reward_timeout":  # an OverflowError at the first scoring before
        extra = ["--reward-timeout", "inf"]
    elif case == "checkpoint_folder":  # checkpoints/step-N/ instead of checkpoints/step-N/hf
        from math_helpers import tiny_model_dir

        model = str(tmp_path / "step-000008")
        tiny_model_dir(tmp_path / "step-000008" / "hf")
    elif case == "broken_template":
        (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
        extra = ["--chat-template", str(tmp_path / "broken.jinja")]
    elif case == "no_template_file":
        extra = ["--chat-template", str(tmp_path / "missing.jinja")]
    elif case == "no_chat_template":  # e.g. a base model's directory
        from math_helpers import tiny_model_dir

        model = str(tiny_model_dir(tmp_path / "base", math_tokenizer(chat_template=None)))
    else:
        data = [write_jsonl(tmp_path / "bad.jsonl", [{"text": "q 1", "answer": "1"}])]
    assert main(["eval", "--model", model, "--data", *data, "--n", n, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path, eval_files, monkeypatch, caplog):
    """The training run's fallback (luffy_fast.model_loading.pad_with_eos): pad = EOS, logged."""
    from math_helpers import tiny_model_dir

    model = tiny_model_dir(tmp_path / "bare", math_tokenizer(pad=False))
    engines = []

    def scripted(name, model, tokenizer, args, max_model_len):
        engines.append(ScriptedEngine(tokenizer))
        return engines[-1]

    monkeypatch.setattr(eval_cli, "build_engine", scripted)
    with caplog.at_level("WARNING", logger="luffy_fast"):
        assert main(["eval", "--model", str(model), "--data", eval_files[1], "--n", "1",
                     "--reward-workers", "0"]) == 0
    tokenizer = engines[0].tokenizer
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token_id) == ("<eos>", 1, 1)
    assert "no pad token: padding with its EOS token '<eos>'" in caplog.text
    assert engines[0].prompts == ["q 3 so", "q 4 so"]


def test_a_chat_template_file_replaces_the_models(tmp_path, eval_files, monkeypatch):
    """--chat-template: the prompts are rendered with the given template, also for a model
    directory that has none."""
    from math_helpers import tiny_model_dir

    model = tiny_model_dir(tmp_path / "base", math_tokenizer(chat_template=None))
    template = tmp_path / "think.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                        "{% endif %}{% endfor %} so so")
    engines = []

    def scripted(name, model, tokenizer, args, max_model_len):
        engines.append(ScriptedEngine(tokenizer))
        return engines[-1]

    monkeypatch.setattr(eval_cli, "build_engine", scripted)
    assert main(["eval", "--model", str(model), "--data", eval_files[1], "--n", "1",
                 "--reward-workers", "0", "--chat-template", str(template)]) == 0
    assert engines[0].prompts == ["q 3 so so", "q 4 so so"]


def test_generation_past_the_models_window_is_warned_about(tmp_path, model_dir, eval_files,
                                                           monkeypatch):
    monkeypatch.setattr(eval_cli, "build_engine",
                        lambda name, model, tokenizer, args, length: ScriptedEngine(tokenizer))
    # the tiny model's window is 128 tokens; "q 1 so" is 3 tokens (the chat template's): 3 + 125
    # fills it exactly, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["eval", "--model", str(model_dir), "--data", eval_files[0], "--n", "1",
                     "--max-new-tokens", "125", "--reward-workers", "0", "--engine", "hf"]) == 0
    with pytest.warns(RuntimeWarning, match=r"--max-new-tokens: the longest prompt plus 126 new "
                                            r"tokens is 129 tokens, more than the model's "
                                            r"window \(128, max_position_embeddings\)"):
        assert main(["eval", "--model", str(model_dir), "--data", eval_files[0], "--n", "1",
                     "--max-new-tokens", "126", "--reward-workers", "0", "--engine", "hf"]) == 0
    # with YaRN the window is longer than max_position_embeddings says: no warning
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0,
                              "original_max_position_embeddings": 128}
    (model_dir / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["eval", "--model", str(model_dir), "--data", eval_files[0], "--n", "1",
                     "--max-new-tokens", "126", "--reward-workers", "0", "--engine", "hf"]) == 0


def test_generation_past_the_models_window_is_an_error_with_vllm(tmp_path, model_dir, eval_files,
                                                                 monkeypatch, capsys):
    """vLLM refuses a max_model_len past max_position_embeddings: said before it starts."""
    def never(*args):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(eval_cli, "build_engine", never)
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    arguments = ["eval", "--model", str(model_dir), "--data", eval_files[0], "--n", "1",
                 "--max-new-tokens", "126", "--reward-workers", "0", "--engine", "vllm"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.splitlines()) == 2  # and the --debug hint
    assert ("configuration error: --max-new-tokens: the longest prompt plus 126 new tokens is 129 "
            "tokens, more than the model's window (128, max_position_embeddings), which vLLM "
            "refuses: lower --max-new-tokens, or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to generate "
            "past it anyway") in error
    # allowed past it, as vLLM allows it ("1" or "true", any case): a warning, and the engine
    # starts
    monkeypatch.setattr(eval_cli, "build_engine",
                        lambda name, model, tokenizer, args, length: ScriptedEngine(tokenizer))
    for allowed in ("1", " True"):
        monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", allowed)
        with pytest.warns(RuntimeWarning, match=r"is 129 tokens, more than the model's window"):
            assert main(arguments) == 0
    # a config whose model_max_length covers the length: vLLM takes it too
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_max_length": 129}))
    with pytest.warns(RuntimeWarning, match=r"is 129 tokens, more than the model's window"):
        assert main(arguments) == 0
