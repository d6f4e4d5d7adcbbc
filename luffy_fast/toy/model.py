"""The demo's policy and tokenizer, built locally: no download.

The tokenizer is a word-level `tokenizers` model over the task's vocabulary (one token per
whitespace-separated symbol); the policy is a tiny Qwen2 with random initial weights. Both are
saved with `save_pretrained`, so any engine that loads a transformers directory (vLLM included)
can load the same folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from luffy_fast.toy.problems import EOS, PAD, vocabulary


def word_level_tokenizer(words, pad: str | None = PAD, eos: str = EOS, unk: str = PAD,
                         chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per whitespace-separated word of `words` (ids in order),
    built locally; decoding joins tokens with spaces. `pad=None` leaves it without a pad token."""
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, unk_token=unk,
                                        clean_up_tokenization_spaces=False,
                                        **({"pad_token": pad} if pad is not None else {}))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tokenizer(num_digits: int) -> PreTrainedTokenizerFast:
    return word_level_tokenizer(vocabulary(num_digits))


@dataclass(frozen=True)
class TinyQwen2Config:
    """Shape of the demo policy (a Qwen2 architecture)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = True


def build_policy(tokenizer: PreTrainedTokenizerFast, shape: TinyQwen2Config,
                 seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, use_cache=True,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def save_pretrained_pair(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                         directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
