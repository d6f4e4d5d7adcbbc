"""`luffy-fast train --dry-run`: everything a run checks before its first step, in seconds on a
CPU, without reading a weight.

It validates the config and the data (counts, length percentiles, truncations), shows the first
prompt as the policy sees it and the first trace, builds the policy on the meta device for its
parameter count, and estimates the memory each GPU needs for the ZeRO stage and token budget
(`estimate_memory`). Settings that cannot work (a token budget below the longest sequence, no
chat template, a window shorter than prompt + response, ...) are listed as problems; the exit
code is 2 when there is any.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from luffy_fast.data import percentiles
from luffy_fast.errors import ConfigError
from luffy_fast.run_files import check_no_file_in_the_way, holds_a_run
from luffy_fast.sampler import prompt_sampler

GIB = 2**30
SHOWN_CHARS = 600  # of the first prompt and trace
GPU_MEMORY_GIB = 80  # the reference run's A100-80GB / H100-80GB
FIT_SHARE = 0.9  # of the GPU's memory that the checkpointing advice plans to fill


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads x head_dim
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer (gathered whole at ZeRO-3)


def model_shape(policy) -> ModelShape:
    config = policy.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = policy.model.layers
    return ModelShape(
        parameters=sum(p.numel() for p in policy.parameters()),
        layers=config.num_hidden_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim,
        vocab=config.vocab_size,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers))


def estimate_memory(shape: ModelShape, zero_stage: int, world_size: int, bf16: bool,
                    token_budget: int, checkpointed_layers: int,
                    head_budget_bytes: float) -> dict[str, float]:
    """Bytes per GPU, by part. Model states as in the ZeRO paper (Rajbhandari et al., 2020):
    mixed precision keeps 2-byte weights and gradients plus 12 bytes of optimizer state per
    parameter (fp32 master weights, Adam's m and v); fp32 training 4 + 4 + 8. Stage 1
    partitions the optimizer state over the GPUs, stage 2 the gradients too, stage 3 the
    weights too (then one layer is gathered whole at a time, and the next one prefetched).
    Activations: a checkpointed layer keeps its input (T h values); any other layer keeps what
    autograd saves of it (`layer_value_bytes`). The first k layers are the checkpointed ones, so
    their recomputes come after the kept layers' values are freed: the peak is at the start of
    the backward with every kept layer's values, or, with all layers checkpointed, one layer
    recomputed (hence checkpointing all L layers holds one input more than L - 1 do). Plus one
    layer's gradients of those values at a time. The fused head never stores [tokens, vocab]
    logits: the final hidden states, their gradient, and its working budget (docs/design.md),
    at most the fp32 logits of the whole micro-batch."""
    P, N = shape.parameters, world_size
    weight_bytes, grad_bytes, state_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    weights = P * weight_bytes / (N if zero_stage == 3 else 1)
    grads = P * grad_bytes / (N if zero_stage >= 2 else 1)
    states = P * state_bytes / (N if zero_stage >= 1 else 1)
    gathered = 2 * shape.largest_layer * weight_bytes if zero_stage == 3 and N > 1 else 0
    T, act, k = token_budget, weight_bytes, checkpointed_layers
    values = layer_value_bytes(shape, T, act)
    held = shape.layers - k if k < shape.layers else 1  # layers whose values are held at once
    activations = k * T * shape.hidden * act + held * values + values
    head = T * shape.hidden * (act + 4) + min(head_budget_bytes, T * shape.vocab * 4)
    parts = {"weights": weights, "gradients": grads, "optimizer states": states,
             "gathered layer (ZeRO-3)": gathered, "activations": activations,
             "fused loss head": head}
    parts["total"] = sum(parts.values())
    return parts


def layer_value_bytes(shape: ModelShape, tokens: int, act: int) -> int:
    """What autograd keeps of one decoder layer's forward: per token 10 h + 2 kv + 4 i values of
    `act` bytes. Counted from a bf16 Qwen2 layer's saved tensors (tests/test_dry_run.py): its two
    RMSNorms each keep their input in fp32 (2 h each, in 2-byte units) and their normalized
    values before the weight (h each); the linear layers keep their inputs (the two norms'
    outputs and the attention's output, 3 h); the attention keeps q (h), k and v (2 kv); the
    MLP keeps gate, up, SiLU(gate) and their product (4 i)."""
    return tokens * (10 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate) * act


def fewest_checkpointed_layers(estimate, layers: int, limit_bytes: float) -> int | None:
    """The fewest checkpointed layers whose `estimate(k)["total"]` fits in `limit_bytes`, or None
    when no count does."""
    fits = [k for k in range(layers + 1) if estimate(k)["total"] <= limit_bytes]
    return min(fits) if fits else None


def checkpointed_count(model, layers: int) -> int:
    """How many decoder layers the run checkpoints (model.gradient_checkpointing,
    model.checkpointed_layers)."""
    if not model.gradient_checkpointing:
        return 0
    return layers if model.checkpointed_layers is None else model.checkpointed_layers


def checkpointing_advice(estimate, layers: int, checkpointed: int) -> str:
    """The fewest checkpointed layers that fit in FIT_SHARE of a GPU_MEMORY_GIB GPU, by the
    estimate: each layer that is not checkpointed saves its recompute in the backward."""
    limit = FIT_SHARE * GPU_MEMORY_GIB * GIB
    fewest = fewest_checkpointed_layers(estimate, layers, limit)
    where = f"in {FIT_SHARE:.0%} of an {GPU_MEMORY_GIB} GiB GPU"
    if fewest is None:
        return f"  checkpointing: no setting fits {where} by this estimate"
    if fewest == 0:
        advice = "every layer's activations fit: gradient checkpointing can be off"
    else:
        advice = (f"the fewest checkpointed layers that fit {where}: {fewest} of {layers} "
                  f"(model.gradient_checkpointing: true, model.checkpointed_layers: {fewest})")
    if fewest < checkpointed:
        advice += f"; this run checkpoints {checkpointed}, recomputing more than it must"
    return (f"  checkpointing: {advice} (an estimate: check the first steps' "
            f"peak_memory_mb/update)")


def _show(text: str) -> str:
    text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f" ... [{len(text)} chars]"
    return "    " + text.replace("\n", "\n    ")


def dry_run(config, world_size: int = 1, out: TextIO | None = None) -> int:
    """Check `config` as a run would, print the report; 0 when nothing blocks the run, else 2."""
    from luffy_fast.model_loading import check_checkpointed_layers

    started = time.perf_counter()
    problems: list[str] = []
    say = lambda line="": print(line, file=out or sys.stdout)  # noqa: E731
    say(f"dry run: model {config.model.path}, data {config.data.source} "
        f"(task {config.data.task_name}), {world_size} GPU(s), ZeRO-{config.train.zero_stage}")
    from luffy_fast.distributed import check_loss_backend, check_world_size

    checked(lambda: check_world_size(config, world_size), problems)
    checked(lambda: check_loss_backend(config, torch.device("cuda")), problems)  # GPUs planned
    output_dir_check(config.output.dir, problems, say)
    task, tokenizer, policy, notes = tokenizer_for(config, problems)
    for note in notes:
        say(f"note: {note}")
    notes_shown = list(notes)
    samples = training_data(task, tokenizer, config, problems) if tokenizer is not None else []
    if tokenizer is not None:
        heldout_data(task, tokenizer, config, problems, say)
    report = task.data_report if task is not None else None
    if report is not None:
        say(f"data: {report.summary()}")
        say(f"  trace lengths (before the cut): {percentiles(report.trace_lengths)}")
    if samples:
        say(f"data: {len(samples)} training prompts; prompt lengths "
            f"{percentiles([len(s.prompt_ids) for s in samples])}; trace lengths "
            f"{percentiles([len(t) for s in samples for t in s.traces])}")
        # (too few prompts for a step is already a problem: check_samples reports it)
        sampler = checked(lambda: prompt_sampler(samples, config), [])  # sets steps
        if sampler is not None:
            say(f"sampling: {sampler.batches_per_epoch} steps per epoch of "
                f"{config.train.prompts_per_step} prompts (seed {config.train.seed}); run length "
                + (f"{config.train.epochs} epochs = {config.train.steps} steps"
                   if config.train.epochs else f"{config.train.steps} steps"))
        say("first prompt, as the policy sees it:")
        say(_show(tokenizer.decode(samples[0].prompt_ids, skip_special_tokens=False)))
        if samples[0].traces:
            say(f"first trace ({len(samples[0].traces[0])} tokens):")
            say(_show(tokenizer.decode(samples[0].traces[0], skip_special_tokens=False)))
    if task is not None and config.model.path != "toy":
        policy = meta_model(config, tokenizer, problems, notes)
    for note in notes[len(notes_shown):]:
        say(f"note: {note}")
    if policy is not None:
        shape = model_shape(policy)
        bf16 = config.model.precision != "fp32"
        budget = config.loss.memory_budget_bytes(torch.device("cuda"))  # the GPUs' budget
        estimate = lambda k: estimate_memory(  # noqa: E731 - k: checkpointed layers
            shape, config.train.zero_stage, world_size, bf16, config.train.token_budget, k, budget)
        checked(lambda: check_checkpointed_layers(config.model), problems)
        checkpointed = min(checkpointed_count(config.model, shape.layers), shape.layers)
        memory = estimate(checkpointed)
        say(f"model: {shape.parameters / 1e9:.3f} B parameters ({shape.parameters:,}), "
            f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}")
        say(f"memory per GPU (estimate; ZeRO-{config.train.zero_stage} over {world_size} GPU(s), "
            f"{'bf16' if bf16 else 'fp32'}, token budget {config.train.token_budget}, "
            f"{checkpointed} of {shape.layers} layers checkpointed):")
        for name, value in memory.items():
            say(f"  {name:<24} {value / GIB:8.2f} GiB")
        if memory["total"] > GPU_MEMORY_GIB * GIB:
            problems.append(f"train.zero_stage: the estimate ({memory['total'] / GIB:.0f} GiB "
                            f"per GPU) exceeds an {GPU_MEMORY_GIB} GiB GPU; use more GPUs "
                            f"(--world-size), a higher ZeRO stage, a smaller token budget"
                            + (" or more checkpointed layers (model.checkpointed_layers)"
                               if checkpointed < shape.layers else ""))
        say(checkpointing_advice(estimate, shape.layers, checkpointed))
        say(f"  (a naive head would also hold fp32 logits: "
            f"{config.train.token_budget * shape.vocab * 4 / GIB:.1f} GiB per micro-batch)")
        if config.rollout.engine == "vllm":  # on the GPUs
            vllm, share = config.rollout.vllm, config.rollout.vllm.device_memory_utilization(False)
            level = vllm.device_sleep_level(on_cpu=False)
            say(f"rollout: vLLM takes up to {share:.0%} of each GPU while generating and "
                + (f"sleeps (level {level}) during the update" if level else "never sleeps"))
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say(f"dry run done in {time.perf_counter() - started:.1f} s: "
        + (f"{len(problems)} problem(s)" if problems else "no problems found"))
    return 2 if problems else 0


def output_dir_check(folder: str, problems: list[str], say) -> None:
    """What the start will say of `output.dir`, read-only: a file where a folder must be is a
    problem; a previous run there a note (the start needs --resume or --overwrite)."""
    try:
        check_no_file_in_the_way(folder, "output.dir")
    except ConfigError as error:
        problems.append(str(error))
        return
    found = holds_a_run(Path(folder)) if Path(folder).is_dir() else []
    if found:
        say(f"note: output.dir {folder!r} already holds a run ({', '.join(found)}): the start "
            f"needs --resume to continue it or --overwrite to replace it")


def checked(call, problems: list[str]):
    """`call()`, or None with its ConfigError recorded as a problem."""
    try:
        return call()
    except ConfigError as error:
        problems.append(str(error))
        return None


def tokenizer_for(config, problems: list[str]):
    """(task, tokenizer, policy, notes): the tokenizer the run would use, overrides applied.
    The policy is the toy task's own, built once with its tokenizer; None for a model
    directory, whose policy `meta_model` builds after the data are checked."""
    from luffy_fast.tasks import load_task

    notes: list[str] = []
    task = checked(lambda: load_task(config), problems)
    if task is None:
        return None, None, None, notes
    if config.model.path == "toy":
        tokenizer, policy = checked(lambda: task.components(), problems) or (None, None)
        return task, tokenizer, policy, notes
    from luffy_fast.data import load_tokenizer
    from luffy_fast.model_loading import prepare_tokenizer, tokenizer_directory

    raw = checked(lambda: load_tokenizer(tokenizer_directory(config.model)), problems)
    if raw is None:
        return task, None, None, notes
    if raw.pad_token_id is None:
        notes.append("the tokenizer has no pad token: the run pads with its EOS token")
    return task, checked(lambda: prepare_tokenizer(raw, config.model), problems), None, notes


def training_data(task, tokenizer, config, problems: list[str]) -> list:
    """The training samples as the run loads them (through the cache), checked."""
    from luffy_fast.tasks import check_samples

    samples = checked(lambda: task.train_samples(tokenizer), problems)
    if samples is not None:
        checked(lambda: check_samples(samples, config), problems)
    return samples or []


def heldout_data(task, tokenizer, config, problems: list[str], say) -> None:
    """The held-out problems as the run loads them, and the eval section checked against them."""
    from luffy_fast.evaluation import problem_source
    from luffy_fast.validation import check_validation

    heldout = checked(lambda: task.heldout_samples(tokenizer), problems)
    if heldout is None:
        return
    if heldout:
        sources = sorted({problem_source(p) for p in heldout})
        every = config.eval.every
        say(f"validation: {len(heldout)} held-out problems ({', '.join(sources)}), "
            f"{config.eval.n} sample(s) each, "
            + (f"every {every} steps" if every else "never (eval.every=0)"))
    checked(lambda: check_validation(heldout, config, lambda message: say(f"note: {message}")),
            problems)


def meta_model(config, tokenizer, problems: list[str], notes: list[str]):
    """The model directory's policy with meta tensors (no memory, no weights read), its window
    checked."""
    import torch

    from luffy_fast.model_loading import (
        check_attention,
        check_flash_attention_precision,
        meta_policy,
    )

    try:
        check_attention(config.model)
    except ConfigError as error:
        notes.append(f"on this machine: {error}")
    # the planned run trains on GPUs
    checked(lambda: check_flash_attention_precision(config.model, torch.device("cuda")), problems)
    policy = checked(lambda: meta_policy(config.model), problems)
    if policy is None:
        return None
    window = policy.config.max_position_embeddings
    need = config.data.max_prompt_length + config.data.max_response_length
    if window < need:
        problems.append(f"model.max_position_embeddings: the model's window ({window} tokens) is "
                        f"shorter than data.max_prompt_length + data.max_response_length "
                        f"({need}); set model.max_position_embeddings (the reference run: "
                        f"16384, with model.rope_theta=40000)")
    if tokenizer is not None and len(tokenizer) > policy.config.vocab_size:
        problems.append(f"model.tokenizer_path: the tokenizer has {len(tokenizer)} tokens, more "
                        f"than the model's vocabulary ({policy.config.vocab_size})")
    return policy
