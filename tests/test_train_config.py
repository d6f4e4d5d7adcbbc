"""The trainer's config tree: YAML + dotted overrides, and errors that name the bad key."""

from __future__ import annotations

import re

import pytest

from luffy_fast.config import LuffyLossConfig
from luffy_fast.train_config import ConfigError, LuffyTrainConfig, config_from_dict, load_config


def test_defaults_are_the_luffy_reference_loss():
    config = load_config()
    assert isinstance(config, LuffyTrainConfig)
    assert config.loss == LuffyLossConfig.luffy(max_len=config.data.max_response_length)
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
    (["optim.betas=[0.9]"], "optim.betas"),
    (["loss.shaping=maybe"], "loss.shaping: expected true or false"),
    (["model.precision=fp8"], "model.precision"),
    (["data.source=/no/such/file.jsonl"], "data.source: no such file"),
    (["optim"], "expected dotted.key=value"),
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
    # an empty source is no file: the math task read the working folder's data files
    (["data.source="], "data.source: no such file or folder '' (the math task reads one"),
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


def test_an_override_goes_into_a_section_the_file_leaves_empty(tmp_path):
    """`optim:` with its keys commented out is a section of defaults; an override into it was
    "optim: is a value, not a section"."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  # lr: 1.0e-3\neval:\n  every: 0\n")
    assert load_config(path).optim.lr == 1e-6
    assert load_config(path, ["optim.lr=1e-3"]).optim.lr == 1e-3
