"""The trainer's config tree: YAML + dotted overrides, and errors that name the bad key."""

from __future__ import annotations

import re

import pytest

from luffy_fast.config import LuffyLossConfig
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.train_config import ConfigError, LuffyTrainConfig, config_from_dict, load_config


def test_defaults_are_the_luffy_reference_loss():
    config = load_config()
    assert isinstance(config, LuffyTrainConfig)
    assert config.loss == LuffyLossConfig.luffy(max_len=config.data.max_response_length)
    # LUFFY's reference run (docs/algorithm.md): f(p) = p / (p + 0.1), no PPO clipping,
    # entropy bonus 0.001, Dr. GRPO's constant normalizer over the response length
    loss = config.loss
    assert (loss.gamma, loss.shaping, loss.clip_on_policy, loss.clip_off_policy) == (
        0.1, True, False, False)
    assert (loss.entropy_coef, loss.normalizer, loss.max_len) == (0.001, "constant", 8192)
    grpo = LuffyLossConfig.grpo()
    assert (grpo.clip_low, grpo.clip_high, grpo.clip_on_policy, grpo.entropy_coef,
            grpo.normalizer) == (0.2, 0.2, True, 0.0, "token")
    assert (config.rollout.n_on, config.rollout.n_off) == (7, 1)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\nloss:\n  gamma: 0.2\n"
                    "data:\n  max_response_length: 64\n")
    config = load_config(path, ["optim.lr=5e-4", "loss.shaping=false", "train.zero_stage=3",
                                "rollout.n_on=4"])
    assert config.optim.lr == 5e-4  # the override wins; "1e-3" (YAML 1.1 string) is a number
    assert config.optim.betas == (0.9, 0.95)
    assert config.loss.gamma == 0.2 and config.loss.shaping is False
    assert config.loss.max_len == 64  # constant normalizer: max_len follows the response length
    assert config.train.zero_stage == 3 and config.rollout.n_on == 4
    assert config_from_dict(config.to_dict()) == config  # round trip
    warm = load_config(None, ["rollout.temperature=0.7"])
    assert warm.loss.temperature == 0.7  # the loss follows the sampling temperature


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["nonsense.key=1"], "nonsense: unknown key"),
    (["loss.gama=0.1"], "loss.gama: unknown key"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.lr=-1"], "optim.lr: must be a number > 0"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["train.zero_stage=4"], "train.zero_stage: must be one of"),
    (["train.mini_batch_size=3"], "train.mini_batch_size: must divide train.prompts_per_step"),
    (["rollout.n_on=0", "rollout.n_off=1"], "rollout.n_on: a group needs at least two members"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["loss.gamma=0"], "gamma"),
    (["loss.normalizer=mean"], "normalizer"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values (got [0.9])"),
    (["loss.shaping=maybe"], "loss.shaping: expected true or false"),
    (["model.precision=fp8"], "model.precision"),
    (["data.source=/no/such/file.jsonl"], "data.source: no such file"),
    (["optim"], "expected dotted.key=value"),
    (["=1"], "override '=1': expected dotted.key=value"),
    (["optim.lr=1", "optim.lr.x=1"], "optim.lr: is a value, not a section"),
    (["optim.lr=[1"], "optim.lr: cannot parse '[1': "),
    (["optim=5"], "optim: expected a mapping of keys (got 5)"),
    # YAML's true is an int to Python, and 1 to int() and float(): never a count or a rate
    (["train.steps=true"], "train.steps: expected an integer (got True)"),
    (["optim.lr=true"], "optim.lr: expected a number (got True)"),
    (["optim.lr=.inf"], "optim.lr: must be a number > 0.0 (got inf)"),
    (["output.dir=5"], "output.dir: expected a string (got 5)"),
    (["loss.temperature=0.7"], "loss.temperature: must equal rollout.temperature"),
    # the loss section is built from these: their own key is named, not the loss field
    (["data.max_response_length=0"], "data.max_response_length: must be an integer >= 1"),
    (["rollout.temperature=0"], "rollout.temperature: must be a number > 0"),
    # each valid alone, wrong together, and they trained without an error
    (["loss.ignore_index=1"], "loss.ignore_index: must be negative (got 1): it marks"),
    (["rollout.engine=vllm", "rollout.vllm.max_model_len=30", "data.max_prompt_length=60",
      "data.max_response_length=64"],
     "rollout.vllm.max_model_len: 30 is below data.max_prompt_length + data.max_response_length "
     "(124)"),
    (["train.seed=4294967295"], "train.seed: must be at most 2147483647"),
    (["reward.timeout=1e7"], "reward.timeout: must be a number > 0.0 and <= 86400.0 (got "),
    (["rollout.vllm.sync_bucket_mb=.inf"], "rollout.vllm.sync_bucket_mb: must be a positive finite"),
    # the demo's config with a user's data or model settings: trained the toy task, silently
    (["data.task=toy", "data.source=/tmp/train.jsonl"], "data.source: the toy task generates its "
     "own problems and would not read '/tmp/train.jsonl'; set data.task: math to use it"),
    (["data.heldout_source=/tmp/aime.parquet"], "data.heldout_source: the toy task generates"),
    # each section's checks, at the first value past each bound (the bounds themselves pass:
    # test_the_bounds_themselves_are_accepted)
    (["data.task=toy_task"], "data.task: must be 'toy', 'math' or 'package.module:Class' (got "
                             "'toy_task')"),
    (["data.num_digits=11"], "data.num_digits: must be at most 10 (got 11)"),
    (["data.heldout_fraction=0"], "data.heldout_fraction: must be a number > 0.0 and <= 0.5 (got "
                                  "0.0)"),
    (["data.heldout_fraction=0.6"], "data.heldout_fraction: must be a number > 0.0 and <= 0.5"),
    (["data.trace_overflow=cut"], "data.trace_overflow: must be one of ['truncate', 'drop'] (got "
                                  "'cut')"),
    (["data.source="], "data.source: no such file or folder '' (the math task reads one"),
    # the held-out file too, at the start rather than once the training data are tokenized
    ([f"data.source={__file__}", "data.heldout_source=/no/such/aime.parquet"],
     "data.heldout_source: no such file or folder '/no/such/aime.parquet' (the math task reads"),
    ([f"data.source={__file__}", "data.heldout_source="],
     "data.heldout_source: no such file or folder ''"),
    (["rollout.top_p=0"], "rollout.top_p: must be a number > 0.0 and <= 1.0 (got 0.0)"),
    (["rollout.max_batch_size=0"], "rollout.max_batch_size: must be an integer >= 1 (got 0)"),
    (["rollout.tis_cap=0"], "rollout.tis_cap: must be a number > 0.0 (got 0.0)"),
    (["algorithm.ppo_epochs=0"], "algorithm.ppo_epochs: must be an integer >= 1 (got 0)"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas: must be two numbers in [0, 1) (got (0.9, 1.0))"),
    (["optim.eps=0"], "optim.eps: must be a number > 0.0 (got 0.0)"),
    (["optim.grad_clip=-0.5"], "optim.grad_clip: must be a number >= 0.0 (got -0.5)"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps: must be an integer >= 0 (got -1)"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio: must be a number >= 0.0 and <= 1.0 (got 1.5)"),
    (["train.max_nonfinite_steps=-1"], "train.max_nonfinite_steps: must be an integer >= 0 (got -1)"),
    (["train.epochs=0"], "train.epochs: must be an integer >= 1 (got 0)"),
    (["eval.best_metric=val_accuracy"], "eval.best_metric: must name a validation metric such as "
                                        "'val/macro/avg@1' (got 'val_accuracy')"),
    (["output.dir="], "output.dir: must not be empty"),
    (["output.wandb_project=' '"], "output.wandb_project: must not be empty (null turns W&B off)"),
    (["output.keep_checkpoints=0"], "output.keep_checkpoints: must be an integer >= 1 (got 0)"),
    (["loss.max_len=63", "data.max_response_length=64"], "loss.max_len: the 'constant' normalizer's "
     "max_len (63) is below data.max_response_length (64)"),
    (["loss.ignore_index=0"], "loss.ignore_index: must be negative (got 0)"),
    (["rollout.engine=vllm", "rollout.vllm.max_model_len=123", "data.max_prompt_length=60",
      "data.max_response_length=64"], "rollout.vllm.max_model_len: 123 is below"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, override)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


def test_files_that_would_silently_train_on_other_settings_are_refused(tmp_path):
    """A second `train:` section replaced the first (PyYAML keeps the last key), an empty file
    trained on every default; a folder was "does not exist", a file that is not UTF-8 an error
    naming no file."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  prompts_per_step: 8\n  mini_batch_size: 8\noptim:\n  lr: 1.0e-3\n"
                     "train:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml' is not valid YAML: the key 'train' is "
                                          r"given twice in one mapping\n  in .*, line 6, column 1"):
        load_config(twice)
    anchored = tmp_path / "anchored.yaml"  # a merge key overrides by design
    anchored.write_text("optim: &base {lr: 1.0e-3, warmup_steps: 1}\nrollout:\n  n_on: 3\n")
    assert load_config(anchored).rollout.n_on == 3
    for text in ("", "# only a comment\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml' is empty \(no settings\)$"):
            load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file$"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"^--config: the path is empty$"):
        load_config("")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text \(byte 22\)$"):
        load_config(tmp_path / "latin1.yaml")


def test_a_mistyped_key_gets_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"^optim.lrr: unknown key \(did you mean 'lr'\? known"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^train.stpes: unknown key \(did you mean 'steps'\?"):
        load_config(None, ["train.stpes=1"])
    with pytest.raises(ConfigError, match=r"^optim.zzz: unknown key \(known keys: "):
        load_config(None, ["optim.zzz=1"])


def test_the_bounds_themselves_are_accepted():
    """Each check's bound is inside the range (test_bad_values_name_the_key has the first value
    past it)."""
    config = load_config(None, [
        "data.num_digits=10", "data.heldout_fraction=0.5", "rollout.n_on=0", "rollout.n_off=2",
        "optim.grad_clip=0", "optim.warmup_steps=0", "optim.min_lr_ratio=1",
        "train.max_nonfinite_steps=0", "train.seed=2147483647", "eval.every=0",
        "eval.num_problems=0", "eval.temperature=0", "output.save_every=0", "output.log_every=0",
        "reward.workers=0", "loss.ignore_index=-1",
        # max_len exactly the response length; the vLLM window exactly prompt + response
        "data.max_prompt_length=60", "data.max_response_length=64", "loss.max_len=64",
        "rollout.engine=vllm", "rollout.vllm.max_model_len=124"])
    assert (config.data.num_digits, config.data.heldout_fraction) == (10, 0.5)
    assert (config.rollout.n_on, config.rollout.n_off) == (0, 2)
    assert (config.optim.grad_clip, config.optim.warmup_steps, config.optim.min_lr_ratio) == (
        0.0, 0, 1.0)
    assert (config.train.max_nonfinite_steps, config.train.seed) == (0, 2**31 - 1)
    assert (config.eval.every, config.eval.num_problems, config.eval.temperature) == (0, 0, 0.0)
    assert (config.output.save_every, config.output.log_every, config.reward.workers) == (0, 0, 0)
    assert (config.loss.ignore_index, config.loss.max_len) == (-1, 64)
    assert config.rollout.vllm.max_model_len == 124


@pytest.mark.parametrize("options, message", [
    # the first value past each bound; also what a VLLMConfig built by hand is refused for
    (dict(tensor_parallel_size=0), "tensor_parallel_size: must be an integer >= 1 (got 0)"),
    (dict(tensor_parallel_size=2.0), "tensor_parallel_size: must be an integer >= 1 (got 2.0)"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization: must be in (0, 1] (got 0.0)"),
    (dict(gpu_memory_utilization=1.01), "gpu_memory_utilization: must be in (0, 1] (got 1.01)"),
    (dict(sleep_level=3), "sleep_level: must be 0, 1 or 2 (got 3)"),
    (dict(dtype="fp16"), "dtype: must be one of ['auto', 'float32', 'bfloat16', 'float16'] "
                         "(got 'fp16')"),
    (dict(max_model_len=1), "max_model_len: must be an integer >= 2 (got 1)"),
    (dict(sync_bucket_mb=0), "sync_bucket_mb: must be a positive finite number (got 0)"),
    (dict(sync_bucket_mb=True), "sync_bucket_mb: must be a positive finite number (got True)"),
    (dict(sync_bucket_mb=float("inf")), "sync_bucket_mb: must be a positive finite number (got "
                                        "inf)"),
])
def test_vllm_options_name_the_key(options, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"rollout.vllm.{message}") + "$"):
        VLLMConfig(**options).validate()


def test_the_vllm_options_bounds_themselves_are_accepted():
    for options in (dict(tensor_parallel_size=1, gpu_memory_utilization=1.0, max_model_len=2),
                    dict(sleep_level=0, dtype="float16", sync_bucket_mb=1e-6),
                    dict(sleep_level=1, dtype="float32", sync_bucket_mb=1),
                    dict(sleep_level=2, dtype="bfloat16", gpu_memory_utilization=1e-3)):
        VLLMConfig(**options).validate()


def test_documented_defaults():
    """The defaults the docs state: LUFFY's 128 prompts per step in mini-batches of 64 (two
    optimizer steps per rollout batch), three non-finite steps in a row before a run stops
    (docs/robustness.md)."""
    config = load_config()
    assert (config.train.prompts_per_step, config.train.mini_batch_size) == (128, 64)
    assert config.optimizer_steps_per_rollout() == 2
    assert config.train.max_nonfinite_steps == 3


def test_optimizer_steps_per_rollout_counts_every_epoch():
    # 12 prompts in mini-batches of 4: 3 optimizer steps a pass, 2 passes
    config = load_config(None, ["train.prompts_per_step=12", "train.mini_batch_size=4",
                                "algorithm.ppo_epochs=2"])
    assert config.optimizer_steps_per_rollout() == 6


def test_a_loss_max_len_of_null_follows_the_response_length():
    config = load_config(None, ["loss.max_len=null", "data.max_response_length=48"])
    assert (config.loss.normalizer, config.loss.max_len) == ("constant", 48)


def test_overrides_copy_the_settings_and_an_empty_value_is_an_empty_string():
    """data.cache_dir= ("" turns the cache off) is "", not null (the default cache folder);
    the caller's mapping is left as it was."""
    from luffy_fast.config_parsing import apply_overrides

    settings = {"data": {"cache_dir": "/tmp/c"}}
    assert apply_overrides(settings, ["data.cache_dir=", "data.source= "]) == {
        "data": {"cache_dir": "", "source": ""}}
    assert settings == {"data": {"cache_dir": "/tmp/c"}}
    assert load_config(None, ["data.cache_dir="]).data.cache_dir == ""


def test_a_merge_key_fills_what_the_mapping_does_not_set(tmp_path):
    """`<<: *base` copies an anchored mapping's keys; a key set beside it wins (not a key given
    twice)."""
    path = tmp_path / "merged.yaml"
    path.write_text("optim: &base {lr: 1.0e-3, warmup_steps: 2}\n"
                    "eval:\n  every: 5\n"
                    "rollout:\n  <<: {n_on: 3, n_off: 2}\n  n_on: 5\n")
    config = load_config(path)
    assert (config.rollout.n_on, config.rollout.n_off) == (5, 2)
    assert (config.optim.lr, config.optim.warmup_steps) == (1e-3, 2)


def test_the_settings_as_a_dict_are_what_json_gives_back():
    """to_dict's lists, not tuples: a checkpoint's settings come back from JSON as lists, and a
    tuple there would be a changed setting at every resume."""
    import json

    from luffy_fast.config_parsing import changed_settings

    settings = load_config(None, ["optim.betas=[0.8, 0.95]"]).to_dict()
    assert settings["optim"]["betas"] == [0.8, 0.95] and type(settings["optim"]["betas"]) is list
    assert changed_settings(json.loads(json.dumps(settings)), settings) == []
    later = load_config(None, ["optim.betas=[0.8, 0.9]", "train.steps=5"]).to_dict()
    assert changed_settings(settings, later) == ["optim.betas: [0.8, 0.95] -> [0.8, 0.9]",
                                                 "train.steps: 100 -> 5"]


def test_an_override_goes_into_a_section_the_file_leaves_empty(tmp_path):
    """`optim:` with its keys commented out is a section of defaults; an override into it was
    "optim: is a value, not a section"."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  # lr: 1.0e-3\neval:\n  every: 0\n")
    assert load_config(path).optim.lr == 1e-6
    assert load_config(path, ["optim.lr=1e-3"]).optim.lr == 1e-3
