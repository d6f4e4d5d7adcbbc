"""`luffy-fast train --dry-run`: the 7B recipe checked on a CPU from a config.json-only model
directory (no weights), its parameter count and memory estimate against hand-worked numbers,
and the settings that cannot work reported as problems."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from luffy_fast.cli import main
from luffy_fast.dry_run import ModelShape, estimate_memory, fewest_checkpointed_layers
from math_helpers import math_rows, write_parquet

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "luffy_qwen2.5_math_7b.yaml"
GIB = 2**30

# Qwen2.5-Math-7B's config.json (the architecture of Qwen2.5-7B, a 4096-token window)
QWEN25_MATH_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
    "torch_dtype": "bfloat16", "attention_dropout": 0.0, "initializer_range": 0.02,
}
H, I, L, KV, V = 3584, 18944, 28, 4 * 128, 152064
LAYER = (H * H + H) + 2 * (H * KV + KV) + H * H + 3 * H * I + 2 * H  # q, k, v (biases), o, MLP, norms
PARAMETERS = 2 * V * H + L * LAYER + H  # embeddings, lm_head, layers, final norm
assert PARAMETERS == 7_615_616_512  # Qwen2.5-7B's published 7.61 B


def bpe_tokenizer(corpus: list[str], chat_template: str | None = None, pad: bool = True):
    """A byte-level BPE trained on `corpus` in milliseconds: decoding gives the text back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        **({"pad_token": "<|endoftext|>"} if pad else {}))
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "Qwen2.5-Math-7B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_MATH_7B))
    rows = math_rows()
    corpus = [json.dumps(row) for row in rows] + [
        (ROOT / "configs" / "templates" / "qwen2.5_math_think.jinja").read_text()]
    bpe_tokenizer(corpus).save_pretrained(tmp_path / "tokenizer")
    data = write_parquet(tmp_path / "train.parquet", rows)
    return model, tmp_path / "tokenizer", data


def dry_run(capsys, model, tokenizer, data, tmp_path, *overrides, stream: str = "out"
            ) -> tuple[int, str]:
    """The dry run's exit code and its standard output (`stream`="err": its error stream)."""
    code = main(["train", "--config", str(RECIPE), "--dry-run", "--world-size", "8",
                 f"model.path={model}", f"model.tokenizer_path={tokenizer}",
                 f"model.chat_template={ROOT / 'configs/templates/qwen2.5_math_think.jinja'}",
                 f"data.source={data}", "data.heldout_source=null",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.prompts_per_step=8",
                 "train.mini_batch_size=8", *overrides])  # one prompt per GPU
    captured = capsys.readouterr()
    assert "prompts kept" not in captured.err  # the report's data line, not a run's start-up line
    return code, getattr(captured, stream)


def test_dry_run_of_the_7b_recipe_on_a_config_only_directory(setup, tmp_path, capsys):
    model, tokenizer, data = setup
    started = time.perf_counter()
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path)
    seconds = time.perf_counter() - started
    print(f"dry run of the 7B recipe: {seconds:.1f} s")  # reported, not asserted (shared machine)
    assert code == 0, out
    assert "no problems found" in out
    assert f"model: 7.616 B parameters ({PARAMETERS:,}), 28 layers, hidden 3584" in out
    # the recipe's template: Qwen2.5-Math's default system prompt (the rows have none), and a
    # generation prompt that opens the reasoning with <think>
    assert ("    <|im_start|>system\n    Please reason step by step, and put your final answer "
            "within \\boxed{}.<|im_end|>\n    <|im_start|>user\n    q 0 0 0 0 0 0 0<|im_end|>\n"
            "    <|im_start|>assistant\n    <think>\n" in out)
    assert "0 </think> \\boxed{0}<|endoftext|>" in out.split("first trace (")[1]
    assert "20 rows, 20 prompts kept, 0 skipped" in out  # 1024 / 8192 tokens fit them all
    # ZeRO-3 over 8 GPUs in bf16: 2 + 2 + 12 bytes per parameter, all divided by 8
    for name, bytes_per_parameter in (("weights", 2), ("gradients", 2),
                                      ("optimizer states", 12)):
        assert f"{name:<24} {PARAMETERS * bytes_per_parameter / 8 / GIB:8.2f} GiB" in out
    layer_gathered = 2 * LAYER * 2  # one layer whole, one prefetched, bf16
    assert f"{'gathered layer (ZeRO-3)':<24} {layer_gathered / GIB:8.2f} GiB" in out
    assert "sampling: 2 steps per epoch of 8 prompts (seed 47); run length 500 steps" in out
    # Checkpointing advice, by hand: 32768 tokens; a layer's values are 32768 x (10 H + 2 KV +
    # 4 I) x 2 bytes, its input 32768 x H x 2. States, gathered layer and head are fixed. The
    # first k layers checkpointed: the 28 - k others' values held at once (one recomputed layer
    # when k = 28), and one layer's gradients.
    T, budget = 32768, 1024 * 2**20  # the fused head's default budget on a GPU
    values, kept_input = T * (10 * H + 2 * KV + 4 * I) * 2, T * H * 2
    fixed = 16 * PARAMETERS / 8 + layer_gathered + T * H * 6 + budget
    total = lambda k: fixed + k * kept_input + (L - k if k < L else 1) * values + values  # noqa: E731
    fewest = min(k for k in range(L + 1) if total(k) <= 0.9 * 80 * GIB)
    assert 0 < fewest < L  # the check below is not the trivial case
    assert "28 of 28 layers checkpointed" in out
    assert (f"checkpointing: the fewest checkpointed layers that fit in 90% of an 80 GiB GPU: "
            f"{fewest} of 28 (model.gradient_checkpointing: true, model.checkpointed_layers: "
            f"{fewest}); this run checkpoints 28, "
            f"recomputing more than it must") in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path,
                        f"model.checkpointed_layers={fewest}")
    assert code == 0 and f"{fewest} of 28 layers checkpointed" in out
    activations = total(fewest) - fixed
    assert f"{'activations':<24} {activations / GIB:8.2f} GiB" in out
    assert "recomputing more than it must" not in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "model.checkpointed_layers=29")
    assert code == 2
    assert "PROBLEM: model.checkpointed_layers: 29 is more than the model's 28 layers" in out


def test_settings_that_cannot_work_are_problems(setup, tmp_path, capsys):
    model, _, data = setup
    bare = tmp_path / "bare-tokenizer"
    bpe_tokenizer([json.dumps(r) for r in math_rows()], pad=False).save_pretrained(bare)
    code, out = dry_run(capsys, model, bare, data, tmp_path, "model.chat_template=null",
                        "model.max_position_embeddings=null", "train.token_budget=8000")
    assert code == 2
    assert "note: the tokenizer has no pad token: the run pads with its EOS token" in out
    assert "PROBLEM: model.chat_template: the tokenizer has no chat template" in out
    assert ("PROBLEM: model.max_position_embeddings: the model's window (4096 tokens) is "
            "shorter than data.max_prompt_length + data.max_response_length (9216)") in out

    _, tokenizer, _ = setup
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "train.token_budget=8000")
    assert code == 2
    assert "PROBLEM: train.token_budget: 8000 tokens per micro-batch, but the longest sequence" in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "--world-size=1")
    assert "PROBLEM: train.zero_stage: the estimate" in out  # 16 bytes x 7.6 B on one GPU
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "model.precision=fp32",
                        "model.attn_implementation=flash_attention_2")
    assert code == 2 and ("PROBLEM: model.attn_implementation: 'flash_attention_2' runs in bf16 "
                          "on CUDA only, and this run trains in fp32 on cuda") in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "loss.grad_filter=0.5",
                        "train.loss_backend=torch")
    assert code == 2 and ("PROBLEM: loss.grad_filter: the gradient filter is an option of the "
                          "triton backend, and this run's loss runs on the 'torch' backend") in out
    # output.dir as the start sees it (the dry run said "no problems found" for both)
    (tmp_path / "a-file").write_text("x")
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path,
                        f"output.dir={tmp_path / 'a-file' / 'run'}")
    assert code == 2 and f"PROBLEM: output.dir: '{tmp_path / 'a-file' / 'run'}' cannot be a folder" in out
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "metrics.jsonl").write_text("{}\n")
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path,
                        f"output.dir={tmp_path / 'old-run'}")
    assert (f"note: output.dir '{tmp_path / 'old-run'}' already holds a run (metrics.jsonl): the "
            f"start needs --resume to continue it or --overwrite to replace it") in out


def test_memory_estimate_by_hand():
    shape = ModelShape(parameters=1000, layers=2, hidden=4, intermediate=8, kv_dim=2, vocab=10,
                       largest_layer=100)
    values = 16 * (10 * 4 + 2 * 2 + 4 * 8) * 2  # one layer's values: 16 tokens x 76 x 2 bytes
    stage0 = estimate_memory(shape, 0, 4, True, token_budget=16, checkpointed_layers=2,
                             head_budget_bytes=64)
    # both layers checkpointed: their inputs, one layer recomputed and its gradients
    assert stage0 == {"weights": 2000, "gradients": 2000, "optimizer states": 12000,
                      "gathered layer (ZeRO-3)": 0,
                      "activations": 2 * 16 * 4 * 2 + 2 * values,
                      "fused loss head": 16 * 4 * (2 + 4) + 64,
                      "total": 16000 + 2 * 16 * 4 * 2 + 2 * values + 16 * 4 * 6 + 64}
    stage2 = estimate_memory(shape, 2, 4, True, 16, 2, 64)
    assert (stage2["weights"], stage2["gradients"], stage2["optimizer states"]) == (2000, 500, 3000)
    # the first of two checkpointed: its input, the second's values and its gradients; the
    # first's recompute comes after the second's values are freed. One input less than both.
    one = estimate_memory(shape, 2, 4, True, 16, 1, 64)["activations"]
    assert one == 16 * 4 * 2 + values + values
    assert one == stage2["activations"] - 16 * 4 * 2
    stage3 = estimate_memory(shape, 3, 4, False, 16, 0, 64)  # fp32: 4 + 4 + 8 bytes
    assert (stage3["weights"], stage3["gradients"], stage3["optimizer states"]) == (1000, 1000, 2000)
    assert stage3["gathered layer (ZeRO-3)"] == 2 * 100 * 4
    # none checkpointed: every layer's values, and one layer's gradients (no recompute)
    assert stage3["activations"] == 3 * 16 * (10 * 4 + 2 * 2 + 4 * 8) * 4
    # a budget larger than the micro-batch's fp32 logits (16 x 10 x 4 bytes) is not all used
    head = estimate_memory(shape, 0, 4, True, 16, 2, 10**6)["fused loss head"]
    assert head == 16 * 4 * (2 + 4) + 16 * 10 * 4


def test_a_layer_keeps_what_the_estimate_counts():
    """The estimate's per-layer values against what autograd saves of a bf16 Qwen2 decoder layer
    (sdpa), counted by storage through saved_tensors_hooks; parameters excluded."""
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from luffy_fast.dry_run import layer_value_bytes

    T, h, i, heads, kv_heads = 256, 64, 256, 4, 2
    config = Qwen2Config(hidden_size=h, intermediate_size=i, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=100,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = Qwen2DecoderLayer(config, 0).to(torch.bfloat16).train()
    x = torch.randn(1, T, h, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(T)[None]
    rope = Qwen2RotaryEmbedding(config)(x, positions)
    parameters = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope)
    shape = ModelShape(parameters=0, layers=1, hidden=h, intermediate=i,
                       kv_dim=kv_heads * h // heads, vocab=100, largest_layer=0)
    counted = layer_value_bytes(shape, T, 2)
    # the rest: per-row statistics (the norms' rsqrt, the attention's logsumexp) and RoPE's
    # cos/sin, a few % at this tiny width and less at a real one
    assert counted <= sum(saved.values()) <= 1.05 * counted


def test_fewest_checkpointed_layers_by_hand():
    # totals 100 + 10 per layer not checkpointed, for 4 layers: 140, 130, 120, 110, 100
    estimate = lambda k: {"total": 100 + 10 * (4 - k)}  # noqa: E731
    assert fewest_checkpointed_layers(estimate, 4, 125) == 2
    assert fewest_checkpointed_layers(estimate, 4, 140) == 0
    assert fewest_checkpointed_layers(estimate, 4, 100) == 4
    assert fewest_checkpointed_layers(estimate, 4, 99) is None


def test_dry_run_of_the_toy_config(capsys):
    code = main(["train", "--config", str(ROOT / "configs" / "demo_luffy.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    from luffy_fast.toy.task import ToyTask
    from luffy_fast.train_config import load_config

    _, policy = ToyTask(load_config(ROOT / "configs" / "demo_luffy.yaml")).components()
    count = sum(p.numel() for p in policy.parameters())
    assert f"({count:,}), 4 layers, hidden 128" in out


def test_the_toy_dry_run_builds_the_toy_components_once(capsys, monkeypatch):
    from luffy_fast.toy.task import ToyTask

    built, components = [], ToyTask.components

    def counted(self):
        built.append(components(self))
        return built[-1]

    monkeypatch.setattr(ToyTask, "components", counted)
    code = main(["train", "--config", str(ROOT / "configs" / "demo_luffy.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(built) == 1  # the tokenizer and the policy reported come from one call
    (_, policy), = built
    count = sum(p.numel() for p in policy.parameters())
    assert f"({count:,}), 4 layers, hidden 128, vocab {policy.config.vocab_size}" in out


def test_dry_run_checks_the_held_out_data_and_the_best_metric(setup, tmp_path, capsys):
    model, tokenizer, data = setup
    missing = tmp_path / "nowhere" / "valid.parquet"
    code, err = dry_run(capsys, model, tokenizer, data, tmp_path, f"data.heldout_source={missing}",
                        stream="err")  # stopped at the settings, as a missing data.source is
    assert code == 2 and f"configuration error: data.heldout_source: no such file or folder " \
                         f"'{missing}'" in err, err
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, f"data.heldout_source={data}",
                        "eval.best_metric=val/macro/avg@4")
    assert code == 2
    assert ("PROBLEM: eval.best_metric: 'val/macro/avg@4' is not among the validation metrics of "
            "this run's held-out problems (val/digits/avg@1, val/digits/pass@1, val/macro/avg@1, "
            "val/macro/pass@1)") in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, f"data.heldout_source={data}")
    assert code == 0, out
    assert "validation: 20 held-out problems (digits), 1 sample(s) each, every 10 steps" in out
    # the recipe validates every 10 steps: without held-out data that would do nothing
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path)
    assert code == 0 and "note: eval.every=10, but the task has no held-out problems" in out


def test_dry_run_checks_the_mini_batch_split_over_the_gpus(setup, tmp_path, capsys):
    model, tokenizer, data = setup
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "train.mini_batch_size=4")
    assert code == 2
    assert "PROBLEM: train.mini_batch_size: 4 prompts do not split evenly over 8 ranks" in out


def test_the_7b_report_by_hand_settings(setup, tmp_path, capsys):
    """The report's lines that depend on one setting each, against hand-worked numbers."""
    model, tokenizer, data = setup
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "train.seed=5")
    assert code == 0, out
    assert "sampling: 2 steps per epoch of 8 prompts (seed 5); run length 500 steps" in out
    # 32768 tokens x 152064 vocabulary x 4 bytes = 18.5625 GiB
    assert "(a naive head would also hold fp32 logits: 18.6 GiB per micro-batch)" in out
    # the recipe's colocated vLLM: the CUDA defaults, 0.5 of the memory and sleep level 2
    assert ("rollout: vLLM takes up to 50% of each GPU while generating and sleeps (level 2) "
            "during the update") in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "rollout.vllm.sleep_level=0",
                        "rollout.vllm.gpu_memory_utilization=0.3")
    assert "rollout: vLLM takes up to 30% of each GPU while generating and never sleeps" in out
    # fp32: 4 + 4 + 8 bytes per parameter over 8 GPUs (ZeRO-3), and no flash-attn
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "model.precision=fp32",
                        "model.attn_implementation=sdpa")
    assert code == 0, out
    assert "ZeRO-3 over 8 GPU(s), fp32, token budget 32768" in out
    for name, bytes_per_parameter in (("weights", 4), ("gradients", 4),
                                      ("optimizer states", 8)):
        assert f"{name:<24} {PARAMETERS * bytes_per_parameter / 8 / GIB:8.2f} GiB" in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path,
                        "model.gradient_checkpointing=false")
    assert "0 of 28 layers checkpointed" in out
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "model.checkpointed_layers=29")
    assert "28 of 28 layers checkpointed" in out  # the estimate counts the layers there are


def test_one_gpu_too_small_names_the_estimate(setup, tmp_path, capsys):
    # ZeRO-3 on one GPU: nothing partitioned, no layer gathered. 16 bytes per parameter, the
    # activations of 28 checkpointed layers (their inputs, one recomputed layer's values and its
    # gradients) and the head (hidden states, their gradient, the 1 GiB budget), 32768 tokens.
    model, tokenizer, data = setup
    T = 32768
    values, kept_input = T * (10 * H + 2 * KV + 4 * I) * 2, T * H * 2
    total = 16 * PARAMETERS + 28 * kept_input + 2 * values + T * H * 6 + 2**30
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "--world-size=1")
    assert code == 2
    assert f"{'gathered layer (ZeRO-3)':<24} {0:8.2f} GiB" in out
    assert (f"PROBLEM: train.zero_stage: the estimate ({total / GIB:.0f} GiB per GPU) exceeds an "
            f"80 GiB GPU; use more GPUs (--world-size), a higher ZeRO stage, a smaller token "
            f"budget\n") in out  # every layer checkpointed already: no advice to checkpoint more
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path, "--world-size=1",
                        "model.checkpointed_layers=1")
    assert ("a smaller token budget or more checkpointed layers (model.checkpointed_layers)\n"
            in out)


def test_a_long_first_trace_is_shown_cut(setup, tmp_path, capsys):
    # The first row's trace: 400 zeros, " </think> \\boxed{0}" and EOS: 799 + 19 + 13 = 831
    # characters; the report shows its first 600 ("0 " x 300) and the length.
    model, tokenizer, _ = setup
    rows = math_rows()
    rows[0]["target"][0]["content"] = " ".join(["0"] * 400) + " </think> \\boxed{0}"
    data = write_parquet(tmp_path / "long.parquet", rows)
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path)
    assert code == 0, out
    assert "\n    " + "0 " * 300 + " ... [831 chars]\n" in out.split("first trace (")[1]


def test_the_meta_model_notes_and_a_tokenizer_larger_than_the_vocabulary(setup, tmp_path, capsys,
                                                                         monkeypatch):
    import types

    model, tokenizer, data = setup
    small = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**small, "vocab_size": 300}))  # the BPE: 400
    # flash-attn absent on this machine (a note), planned in bf16 on the GPUs (no problem)
    monkeypatch.setattr("luffy_fast.model_loading.importlib",
                        types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None)))
    code, out = dry_run(capsys, model, tokenizer, data, tmp_path,
                        "model.attn_implementation=flash_attention_2")
    assert code == 2
    assert ("note: on this machine: model.attn_implementation: 'flash_attention_2' needs the "
            "flash-attn package, which is not installed") in out
    assert ("PROBLEM: model.tokenizer_path: the tokenizer has 400 tokens, more than the model's "
            "vocabulary (300)") in out


def test_the_data_lines_of_the_math_setup(model_dir, tmp_path, capsys):
    # tests/math_helpers.py's rows with 9-token prompts allowed: 16 prompts of 3 tokens ("q d so")
    # and 4 of 9; 15 traces of 3 tokens + EOS and 5 of 10 + EOS, cut to 8. Nearest rank of 20
    # sorted values: p50 is the 10th, p90 the 18th, p99 and p100 the 20th.
    from math_helpers import train_yaml, write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", math_rows())
    config = train_yaml(tmp_path / "run.yaml", model_dir, data, tmp_path / "out")
    code = main(["train", "--config", str(config), "--dry-run", "data.max_prompt_length=9",
                 f"data.heldout_source={data}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (f"data: {data}: 20 rows, 20 prompts kept, 0 skipped (prompt too long), 5 traces "
            f"truncated, 0 dropped, 0 prompts without a trace\n") in out
    assert "  trace lengths (before the cut): {'p50': 4, 'p90': 11, 'p99': 11, 'p100': 11}\n" in out
    assert ("data: 20 training prompts; prompt lengths {'p50': 3, 'p90': 9, 'p99': 9, 'p100': 9}; "
            "trace lengths {'p50': 4, 'p90': 8, 'p99': 8, 'p100': 8}\n") in out
    assert "sampling: 5 steps per epoch of 4 prompts (seed 5); run length 3 steps\n" in out
    assert "validation: 20 held-out problems (digits), 1 sample(s) each, never (eval.every=0)" in out
    assert "first trace (4 tokens):\n    0 </think> \\boxed{0} <eos>\n" in out


def test_model_shape_reads_head_dim_and_the_largest_layer():
    import types

    from torch import nn

    from luffy_fast.dry_run import model_shape

    class Policy(nn.Module):
        def __init__(self, **config):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=2, intermediate_size=64,
                                                vocab_size=10, **config)
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(2, 3)])  # 25 and 9

    # head_dim 16 set apart from hidden / heads = 8 (as Qwen3 does): kv_dim = 2 x 16
    shape = model_shape(Policy(head_dim=16, num_key_value_heads=2))
    assert shape == ModelShape(parameters=34, layers=2, hidden=32, intermediate=64, kv_dim=32,
                               vocab=10, largest_layer=25)
    assert model_shape(Policy()).kv_dim == 4 * 8  # no head_dim, no kv heads: 4 heads of 32 / 4


def test_stage_1_and_a_single_gpu_stage_3_by_hand():
    shape = ModelShape(parameters=1000, layers=2, hidden=4, intermediate=8, kv_dim=2, vocab=10,
                       largest_layer=100)
    stage1 = estimate_memory(shape, 1, 4, True, 16, 2, 64)  # optimizer states partitioned only
    assert (stage1["weights"], stage1["gradients"], stage1["optimizer states"]) == (2000, 2000, 3000)
    alone = estimate_memory(shape, 3, 1, True, 16, 2, 64)  # one GPU: no layer to gather
    assert (alone["weights"], alone["gradients"], alone["gathered layer (ZeRO-3)"]) == (2000, 2000, 0)


def test_checkpointing_advice_by_hand():
    from luffy_fast.dry_run import checkpointing_advice

    # a total of 60 GiB + 5 GiB per layer not checkpointed; the limit is 0.9 x 80 = 72 GiB
    estimate = lambda k: {"total": (60 + 5 * (4 - k)) * GIB}  # noqa: E731
    assert checkpointing_advice(estimate, 4, 4) == (
        "  checkpointing: the fewest checkpointed layers that fit in 90% of an 80 GiB GPU: 2 of 4 "
        "(model.gradient_checkpointing: true, model.checkpointed_layers: 2); this run checkpoints "
        "4, recomputing more than it must (an estimate: check the first steps' "
        "peak_memory_mb/update)")
    small = lambda k: {"total": (50 + 5 * (4 - k)) * GIB}  # noqa: E731 - 70 GiB with none
    assert checkpointing_advice(small, 4, 0) == (
        "  checkpointing: every layer's activations fit: gradient checkpointing can be off (an "
        "estimate: check the first steps' peak_memory_mb/update)")
    large = lambda k: {"total": 73 * GIB}  # noqa: E731
    assert checkpointing_advice(large, 4, 4) == (
        "  checkpointing: no setting fits in 90% of an 80 GiB GPU by this estimate")
