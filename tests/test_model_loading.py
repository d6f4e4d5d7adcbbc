"""A model directory's tokenizer and policy as the `model` section asks
(luffy_fast/model_loading.py): which key an error names, the EOS and pad tokens, the attention
implementation the weights load with."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from luffy_fast.errors import ConfigError
from luffy_fast.model_loading import (
    check_flash_attention_precision,
    load_policy,
    model_directory,
    pad_with_eos,
    prepare_tokenizer,
    read_chat_template,
    tokenizer_directory,
)
from luffy_fast.toy.model import word_level_tokenizer
from luffy_fast.train_config import load_config
from math_helpers import WORDS, math_tokenizer


def model_section(*overrides):
    return load_config(None, list(overrides)).model


def test_a_tokenizer_error_names_the_key_that_points_at_it(tmp_path, model_dir):
    assert tokenizer_directory(model_section(f"model.path={model_dir}")) == model_dir
    with pytest.raises(ConfigError, match="^model.tokenizer_path: no such directory '/nowhere'"):
        tokenizer_directory(model_section(f"model.path={model_dir}",
                                          "model.tokenizer_path=/nowhere"))
    with pytest.raises(ConfigError, match="^model.tokenizer_path: .* holds no tokenizer files"):
        tokenizer_directory(model_section(f"model.path={model_dir}",
                                          f"model.tokenizer_path={tmp_path}"))
    with pytest.raises(ConfigError, match="^model.path: .* holds no tokenizer files"):
        tokenizer_directory(model_section(f"model.path={tmp_path}"))


def test_a_model_path_without_a_model_is_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        model_directory(model_section(f"model.path={tmp_path / 'nowhere'}"))
    assert str(error.value) == (f"model.path: no such directory '{tmp_path / 'nowhere'}' (a local "
                                f"transformers model directory, or 'toy'; nothing is downloaded)")
    with pytest.raises(ConfigError) as error:
        model_directory(model_section(f"model.path={tmp_path}"))
    assert str(error.value) == (f"model.path: '{tmp_path}' has no config.json (not a "
                                f"transformers model directory)")


def test_a_blank_chat_template_file_is_empty(tmp_path):
    """Whitespace only would read as "the tokenizer has no chat template"."""
    (tmp_path / "blank.jinja").write_text(" \n\t\n")
    with pytest.raises(ConfigError) as error:
        read_chat_template(tmp_path / "blank.jinja", "model.chat_template")
    assert str(error.value) == (f"model.chat_template: '{tmp_path / 'blank.jinja'}' is empty (a "
                                f"Jinja chat template)")


def test_eos_is_required_and_an_existing_pad_token_is_kept(model_dir):
    model = model_section(f"model.path={model_dir}")
    no_eos = word_level_tokenizer(WORDS, pad="<pad>", eos=None, unk="<pad>")
    with pytest.raises(ConfigError, match="has no EOS token"):
        prepare_tokenizer(no_eos, model)
    tokenizer = prepare_tokenizer(math_tokenizer(), model)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)  # "<pad>" stays the pad
    assert pad_with_eos(math_tokenizer(pad=False)).pad_token_id == 1  # none: EOS pads


def test_flash_attention_in_bf16_on_the_cpu_is_refused():
    flash = model_section("model.attn_implementation=flash_attention_2", "model.precision=bf16")
    with pytest.raises(ConfigError, match="runs in bf16 on CUDA only, and this run trains in bf16 "
                                          "on cpu"):
        check_flash_attention_precision(flash, torch.device("cpu"))
    check_flash_attention_precision(flash, torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="trains in fp32 on cuda"):
        check_flash_attention_precision(dataclasses.replace(flash, precision="fp32"),
                                        torch.device("cuda", 0))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_policy_loads_with_the_attention_asked_for(model_dir, attention):
    model = model_section(f"model.path={model_dir}", f"model.attn_implementation={attention}")
    policy = load_policy(model, torch.float32)
    assert policy.config._attn_implementation == attention
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


def test_an_empty_model_path_is_not_the_working_folder(model_dir, monkeypatch):
    """`model.path=` (empty) read as Path("") is the working folder: started inside a model
    directory, a run trained that model without saying so."""
    from luffy_fast.model_config import ModelConfig
    from luffy_fast.model_loading import model_directory

    monkeypatch.chdir(model_dir)
    assert model_directory(ModelConfig(path=str(model_dir))) == model_dir
    for path in ("", "  "):
        with pytest.raises(ConfigError, match=re.escape(f"model.path: no such directory {path!r}")):
            model_directory(ModelConfig(path=path))
