"""The `model` section of the trainer's configuration (luffy_fast/train_config.py): which policy,
its shape when it is the demo's toy, and how it is built (precision, attention, Liger's layer
kernels, gradient checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from luffy_fast.config_parsing import check_choice as _choice
from luffy_fast.config_parsing import check_finite as _finite
from luffy_fast.config_parsing import check_int as _positive_int
from luffy_fast.errors import ConfigError

TOY_MAX_PARAMETERS = 1e9  # the toy model is built with random weights, on the CPU too


@dataclass
class ModelConfig:
    """The policy. path "toy" builds the demo's tiny Qwen2 from the shape fields below (random
    weights, no download); anything else is a local transformers model directory."""

    path: str = "toy"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # how many decoder layers recompute their activations in the backward (the first N; None:
    # all). Fewer is faster where memory allows: `luffy-fast train --dry-run` estimates it.
    checkpointed_layers: Optional[int] = None
    # Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels in the policy's layers (CUDA only; the
    # loss is ours either way): luffy_fast/model_loading.py, apply_liger_kernels
    liger_kernels: bool = False
    precision: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    # applied at load (luffy_fast/model_loading.py), None keeps the directory's own value
    tokenizer_path: Optional[str] = None  # the tokenizer's directory (default: path)
    rope_theta: Optional[float] = None
    max_position_embeddings: Optional[int] = None
    chat_template: Optional[str] = None  # a Jinja file replacing the tokenizer's chat template

    def trains_in_bf16(self, device) -> bool:
        """Whether the policy trains in bf16 on `device` (a torch.device): "auto" resolved."""
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            _positive_int("model", name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size: must be divisible by model.num_attention_heads "
                              f"({self.hidden_size} % {self.num_attention_heads} != 0)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("model.num_key_value_heads: must divide model.num_attention_heads")
        _choice("model", "precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("model", "attn_implementation", self.attn_implementation,
                ("sdpa", "eager", "flash_attention_2"))
        if self.rope_theta is not None:
            _finite("model", "rope_theta", self.rope_theta, 0.0, low_open=True)
        if self.max_position_embeddings is not None:
            _positive_int("model", "max_position_embeddings", self.max_position_embeddings)
        if self.checkpointed_layers is not None:
            _positive_int("model", "checkpointed_layers", self.checkpointed_layers, minimum=0)
            if not self.gradient_checkpointing:
                raise ConfigError("model.checkpointed_layers: needs model.gradient_checkpointing:"
                                  " true (without it no layer is checkpointed)")
            if self.path == "toy" and self.checkpointed_layers > self.num_hidden_layers:
                raise ConfigError(f"model.checkpointed_layers: {self.checkpointed_layers} is more"
                                  f" than the model's {self.num_hidden_layers} layers")


def check_toy_model(model: ModelConfig) -> None:
    """The toy task's policy (model.path: toy with data.task: toy) builds its own tokenizer and
    shape, with its weights, on the CPU too: a model file setting would be ignored, and a shape
    past TOY_MAX_PARAMETERS is refused (hidden_size 100000 made the dry run allocate 40 GB)."""
    for name in ("tokenizer_path", "chat_template", "max_position_embeddings", "rope_theta"):
        if getattr(model, name) is not None:
            raise ConfigError(f"model.{name}: the toy model (model.path: toy) builds its own "
                              f"tokenizer and shape and would ignore it (got {getattr(model, name)!r})")
    kv = model.hidden_size // model.num_attention_heads * model.num_key_value_heads
    size = model.num_hidden_layers * model.hidden_size * (
        2 * model.hidden_size + 2 * kv + 3 * model.intermediate_size)
    if size > TOY_MAX_PARAMETERS:
        raise ConfigError(f"model: the toy model's shape (hidden_size, intermediate_size, "
                          f"num_hidden_layers) makes {size:.3g} parameters, over the toy model's "
                          f"{TOY_MAX_PARAMETERS:.0e}; a larger model is a directory (model.path)")
