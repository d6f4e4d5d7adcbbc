"""A local transformers model directory as the run's starting point, checked before it loads.

The `model` section's overrides are applied at load, so a stock Qwen2.5-Math-7B directory
becomes the official starting point (docs/algorithm.md §The reference run's settings):
`rope_theta` and `max_position_embeddings` on its config, `chat_template` (a Jinja file) on its
tokenizer. A tokenizer without a pad token (Llama-3's) pads with its EOS token, as verl does,
and says so in a log line; padding only fills batches, never a position the loss reads.
Problems a user can cause raise ConfigError naming the key, before any weight is read.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from luffy_fast.errors import ConfigError

logger = logging.getLogger("luffy_fast")


def model_directory(model) -> Path:
    """model.path as a directory holding a transformers config.json, or a clear error."""
    path = Path(model.path)
    if not str(model.path).strip() or not path.is_dir():  # "": not the working folder
        raise ConfigError(f"model.path: no such directory {model.path!r} (a local transformers "
                          f"model directory, or 'toy'; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {model.path!r} has no config.json (not a transformers "
                          f"model directory)")
    return path


def tokenizer_directory(model) -> Path:
    path = Path(model.tokenizer_path or model.path)
    key = "model.tokenizer_path" if model.tokenizer_path else "model.path"
    if not path.is_dir():
        raise ConfigError(f"{key}: no such directory {str(path)!r}")
    if not any((path / name).is_file() for name in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{key}: {str(path)!r} holds no tokenizer files (tokenizer.json, "
                          f"tokenizer_config.json, ...); set model.tokenizer_path")
    return path


def chat_template_text(model) -> str | None:
    if model.chat_template is None:
        return None
    return read_chat_template(model.chat_template, "model.chat_template")


def read_chat_template(path: str | Path, key: str) -> str:
    """A Jinja chat template file's text, compiled as transformers will render it: a missing
    file or a syntax error is a ConfigError naming `key`, before any model loads."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}: no such file {str(path)!r} (a Jinja chat template)")
    text = Path(path).read_text()
    if not text.strip():  # would read as "the tokenizer has no chat template"
        raise ConfigError(f"{key}: {str(path)!r} is empty (a Jinja chat template)")
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_
    except ImportError:  # another transformers: the tags it adds may fail here; plain Jinja
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_ = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_(text)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"{key}: {str(path)!r} line {error.lineno}: {error.message} "
                          f"(a Jinja syntax error)") from None
    return text


def prepare_tokenizer(tokenizer, model):
    """Apply model.chat_template; a missing pad token becomes EOS (logged); no EOS is an error."""
    template = chat_template_text(model)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of {model.tokenizer_path or model.path!r} "
                          f"has no EOS token (responses and traces end with it)")
    return pad_with_eos(tokenizer)


def pad_with_eos(tokenizer):
    """A tokenizer without a pad token pads with its EOS token (logged); `luffy-fast eval` too."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("the tokenizer has no pad token: padding with its EOS token %r",
                       tokenizer.eos_token)
    return tokenizer


def load_model_tokenizer(model):
    """The tokenizer of model.tokenizer_path (default model.path), overrides applied."""
    from luffy_fast.data import load_tokenizer

    return prepare_tokenizer(load_tokenizer(tokenizer_directory(model)), model)


def check_attention(model) -> None:
    if model.attn_implementation == "flash_attention_2" and \
            importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: 'flash_attention_2' needs the flash-attn "
                          "package, which is not installed (pip install flash-attn, or use "
                          "'sdpa')")


def check_model_options(model, device) -> None:
    """The `model` section's build options against the model and the device, before any weight
    is read: model.attn_implementation, model.liger_kernels, model.checkpointed_layers."""
    check_flash_attention_precision(model, device)
    check_liger(model, device)
    check_checkpointed_layers(model)


def check_flash_attention_precision(model, device) -> None:
    """flash-attn runs 16-bit tensors on CUDA only: in fp32 (transformers only warns at load)
    or on the CPU the first forward would fail inside it."""
    bf16 = model.trains_in_bf16(device)
    if model.attn_implementation == "flash_attention_2" and not (bf16 and device.type == "cuda"):
        raise ConfigError(f"model.attn_implementation: 'flash_attention_2' runs in bf16 on CUDA "
                          f"only, and this run trains in {'bf16' if bf16 else 'fp32'} on "
                          f"{device.type}; use 'sdpa' (or model.precision=bf16 on a GPU)")


def check_liger(model, device) -> None:
    """model.liger_kernels needs liger-kernel, a CUDA device (Liger's Triton kernels do not run on
    the CPU) and a model Liger patches; checked before any weight is read (a task's own policy,
    as the demo's, when it is built: liger_model_error)."""
    if not model.liger_kernels:
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.liger_kernels: needs the liger-kernel package, which is not "
                          "installed (pip install liger-kernel, or the [liger] extra; or set it to false)")
    if device.type != "cuda":
        raise ConfigError(f"model.liger_kernels: Liger's kernels run on CUDA devices only, and "
                          f"this run trains on {device.type}; set it to false")
    if model.path != "toy" and (error := liger_model_error(model_config(model))):
        raise ConfigError(error)


def liger_model_error(config) -> str | None:
    """Why Liger's kernels cannot stand in for this transformers config's layers, or None: a model
    type it has no kernels for (it would patch nothing), or, where it puts in its SwiGLU kernel, an
    MLP activation other than SiLU (the kernel computes SiLU whatever the config says)."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return (f"model.liger_kernels: Liger-Kernel has no kernels for model type "
                f"{model_type!r}; set it to false")
    activation = getattr(config, "hidden_act", "silu")
    swiglu = "swiglu" in inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters
    if swiglu and activation not in ("silu", "swish"):
        return (f"model.liger_kernels: Liger's SwiGLU kernel computes SiLU, and this "
                f"{model_type} model's MLP uses {activation!r}; set it to false")
    return None


def apply_liger_kernels(policy) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels in place of the policy's own (as TRL's
    `use_liger_kernel`; its RoPE patch applies to the whole model type in this process). Not its
    loss kernels: the LM head's loss is luffy-fast's. Parameter names stay as they were, so
    checkpoints and rollout weight syncs are unchanged. A policy Liger cannot patch is refused
    (liger_model_error) rather than left as it was."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    if error := liger_model_error(policy.config):
        raise ConfigError(error)

    _apply_liger_kernel_to_instance(model=policy, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    logger.info("model.liger_kernels: Liger's RMSNorm, SwiGLU and RoPE kernels in the policy")


def prepare_policy(policy, model):
    """The built policy as the `model` section asks: Liger's kernels in its layers
    (model.liger_kernels), gradient checkpointing (model.gradient_checkpointing) of all its
    decoder layers or of the first model.checkpointed_layers."""
    if model.liger_kernels:
        apply_liger_kernels(policy)
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model.checkpointed_layers is not None:
            checkpoint_first_layers(policy, model.checkpointed_layers)
    return policy


def checkpointable_layers(policy) -> list:
    """The policy's decoder layers that transformers can checkpoint one by one, in order: those
    of its language model's decoder (`get_decoder`), so that a vision tower's checkpointable
    blocks do not count as decoder layers."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = next((m for m in policy.modules() if isinstance(m, PreTrainedModel)), None)
    decoder = model.get_decoder() if model is not None else policy
    return [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_first_layers(policy, count: int) -> None:
    """Gradient checkpointing (already enabled) for the first `count` decoder layers only; the
    others keep their activations for the backward, which saves their recompute (about a
    quarter of a layer's forward + backward time) at their activations' memory. The first ones:
    the backward reaches them last, after the kept layers' activations are freed, so their
    recomputes do not add to the peak (with the last ones checkpointed they would)."""
    layers = checkpointable_layers(policy)
    if not layers:
        raise ConfigError("model.checkpointed_layers: this model has no layers that transformers "
                          "checkpoints one by one (GradientCheckpointingLayer); leave it unset")
    if count > len(layers):
        raise ConfigError(f"model.checkpointed_layers: {count} is more than the model's "
                          f"{len(layers)} decoder layers")
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    logger.info("gradient checkpointing: the first %d of %d decoder layers (model.checkpointed_layers)",
                count, len(layers))


def check_checkpointed_layers(model) -> None:
    """model.checkpointed_layers against a model directory's layer count, before any weight is
    read (a task's own policy is checked when it is built: checkpoint_first_layers)."""
    if model.checkpointed_layers is None or model.path == "toy":
        return
    layers = getattr(model_config(model), "num_hidden_layers", None)
    if layers is not None and model.checkpointed_layers > layers:
        raise ConfigError(f"model.checkpointed_layers: {model.checkpointed_layers} is more than "
                          f"the model's {layers} layers (num_hidden_layers in its config.json)")


def model_config(model):
    """The directory's transformers config with model.rope_theta and
    model.max_position_embeddings applied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_directory(model))
    if model.rope_theta is not None:
        parameters = getattr(config, "rope_parameters", None)
        if isinstance(parameters, dict):  # transformers 5 keeps theta among the rope parameters
            config.rope_parameters = {**parameters, "rope_theta": model.rope_theta}
        else:
            config.rope_theta = model.rope_theta
    if model.max_position_embeddings is not None:
        config.max_position_embeddings = model.max_position_embeddings
    return config


def rope_theta(config) -> float | None:
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    return getattr(config, "rope_theta", None)


def load_policy(model, dtype):
    """The causal LM of model.path in `dtype`, with the config overrides."""
    from transformers import AutoModelForCausalLM

    config = model_config(model)
    check_attention(model)
    return AutoModelForCausalLM.from_pretrained(model_directory(model), config=config, dtype=dtype,
                                                attn_implementation=model.attn_implementation)


def meta_policy(model):
    """The policy's modules on the meta device: shapes and parameter counts, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(model), dtype=torch.bfloat16)
