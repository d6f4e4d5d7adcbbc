"""The trainer on one GPU at a real model shape: the Python half of gpu_trainer_check.sh.

    python -m benchmarks.trainer_update prepare --work DIR      # model dir, tokenizer, JSONL, YAML
    python -m luffy_fast train --config DIR/train.yaml          # (run by the shell script)
    python -m benchmarks.trainer_update check-train --work DIR  # metrics.jsonl: finite loss, grad norm
    python -m benchmarks.trainer_update grad-parity --work DIR  # one micro-batch: fused vs reference
    python -m benchmarks.trainer_update update --impl fused --work DIR   # also fused_half, naive, liger,
                                                                         # fused_liger (GPU only)
    python -m benchmarks.trainer_update fit --impl fused --work DIR      # within a memory cap, at
                                                                         # the fewest checkpointed
                                                                         # layers that fit
    python -m benchmarks.trainer_update report --work DIR --out OUT      # one JSON, the table last

The policy is a Qwen2 of Qwen2.5-1.5B's shape (hidden 1536, 28 layers, MLP 8960, 12 heads, 2 KV
heads, vocabulary 151936, tied embeddings) with random weights, built from a config and saved with
save_pretrained; its tokenizer is a word-level one built here with the full vocabulary (every id
decodes); the data is a generated JSONL in the OpenR1-Math layout that `luffy_fast.data` reads.
Nothing is downloaded. With --dry-run (or BENCH_DRY_RUN=1) every stage runs at toy sizes in fp32
on the CPU (DeepSpeed over gloo), so the plumbing is tested without a GPU.

`update` measures the update alone: forward, backward and optimizer step of the policy on a
DeepSpeed ZeRO-2 engine (bf16 with fp32 master weights, the trainer's `deepspeed_config`), with
gradient checkpointing on, for one loss head at a time, in its own process:
- fused: the trainer's `PolicyWithFusedLoss` (`fused_luffy_loss`, logits never materialized);
- fused_half: the same with `logits_dtype: input` (16-bit kept logits; README "Choosing"), for
  tokens/s only: its memory budget, hence its longest sequence, is fused's;
- fused_liger: fused with Liger's RMSNorm, SwiGLU and RoPE kernels in the layers
  (`model.liger_kernels`; CUDA only, not in the script's default stages), for tokens/s;
- naive: the same module with its head swapped for full logits + the naive LUFFY loss
  (benchmarks/naive.py), the usual path;
- liger: the same module with Liger-Kernel's LigerFusedLinearGRPOLoss as the head (GRPO, not
  LUFFY: see benchmarks/liger_baseline.py for what it cannot express).
Per impl: tokens/s and peak memory at each micro-batch size (equal rows of `row_length` tokens),
the allocated memory after every step (it must not grow), then (PROBED) the longest single
sequence that trains (probes doubling from 4k until out of memory; the first failure ends them).
Every measurement is appended to DIR/results/<stage>.jsonl as soon as it exists, so a stage cut
short by its timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# The triton backend on a machine without CUDA runs under Triton's interpreter, which must be
# chosen before luffy_fast.kernels is imported (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from luffy_fast.distributed import deepspeed_config, release_engine  # noqa: E402
from luffy_fast.micro_batches import pack_micro_batch  # noqa: E402
from luffy_fast.policy import PolicyWithFusedLoss  # noqa: E402
from luffy_fast.rollout_batch import assemble_groups  # noqa: E402

IMPLS = ("fused", "fused_half", "naive", "liger", "fused_liger")
PROBED = ("fused", "naive", "liger")  # the heads whose longest trainable sequence is probed
KIB, MIB, GIB = 2**10, 2**20, 2**30


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Sizes of every stage: `REAL` on the GPU, `DRY` on the CPU."""

    # the model (Qwen2 architecture)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    dtype: str  # of the update and the parity check: "bfloat16" or "float32"
    # the `luffy-fast train` run
    train_steps: int
    prompts_per_step: int
    mini_batch_size: int
    n_on: int
    prompt_words: int
    trace_words: int
    max_response_length: int
    num_rows: int  # JSONL rows
    # the gradient parity check: groups of (n_on random responses + 1 trace)
    parity_groups: int
    parity_response: int
    parity_tolerance: float  # relative L2 error of the whole gradient vs the reference backend
    # the update benchmark
    row_length: int  # tokens per row of the throughput micro-batches
    prompt_length: int  # of every row and probe
    micro_batch_tokens: tuple[int, ...]
    target_tokens: int  # the size the tokens/s targets are read at
    timed_steps: int
    probe_lengths: tuple[int, ...]  # single sequences, ascending; the first failure ends them
    growth_tolerance_mb: float  # allocated memory after a step may not rise by more than this
    label: str = "real"

    @property
    def max_length(self) -> int:
        return max(self.probe_lengths + self.micro_batch_tokens)


REAL = Plan(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=151936, dtype="bfloat16",
            train_steps=3, prompts_per_step=4, mini_batch_size=2, n_on=3, prompt_words=16,
            trace_words=24, max_response_length=48, num_rows=32,
            parity_groups=4, parity_response=240, parity_tolerance=3e-2,
            row_length=1024, prompt_length=128, micro_batch_tokens=(4096, 16384, 32768),
            target_tokens=16384, timed_steps=3,
            probe_lengths=(4096, 8192, 16384, 32768, 65536, 131072),
            growth_tolerance_mb=16.0)

DRY = Plan(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512, dtype="float32",
           train_steps=2, prompts_per_step=4, mini_batch_size=2, n_on=2, prompt_words=5,
           trace_words=6, max_response_length=12, num_rows=12,
           parity_groups=2, parity_response=12, parity_tolerance=1e-5,
           row_length=32, prompt_length=8, micro_batch_tokens=(64, 256, 512), target_tokens=256,
           timed_steps=2, probe_lengths=(128, 256, 512), growth_tolerance_mb=1.0, label="dry-run")


def plan_for(args) -> Plan:
    plan = DRY if args.dry_run else REAL
    max_seq = int(os.environ.get("BENCH_MAX_SEQ", "0") or 0)
    if max_seq and not args.dry_run:  # more (or fewer) probes: 4k, 8k, ... up to max_seq
        lengths, length = [], plan.probe_lengths[0]
        while length <= max_seq:
            lengths.append(length)
            length *= 2
        plan = Plan(**{**asdict(plan), "probe_lengths": tuple(lengths) or plan.probe_lengths[:1]})
    return plan


def device_for(plan: Plan) -> torch.device:
    if plan.label == "dry-run":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("trainer_update: no CUDA device (use --dry-run for the CPU toy sizes)")
    return torch.device("cuda")


def dtype_of(plan: Plan) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[plan.dtype]


# --------------------------------------------------------------------------- results files

def results_dir(work: Path) -> Path:
    path = work / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def emit(work: Path, stage: str, row: dict) -> None:
    """Append one measurement to DIR/results/<stage>.jsonl and echo it."""
    row = {"stage": stage, **row}
    with (results_dir(work) / f"{stage}.jsonl").open("a") as out:
        out.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def read_rows(work: Path, stage: str) -> list[dict]:
    path = results_dir(work) / f"{stage}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- prepare

SPECIAL = ["<pad>", "<eos>", "</think>", "q", "so"]
DIGITS = [str(d) for d in range(10)]
BOXED = [f"\\boxed{{{d}}}" for d in range(10)]


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` tokens, so that every id a random policy
    samples decodes: the words of the generated data, then fillers w<i>."""
    from luffy_fast.toy.model import word_level_tokenizer

    words = SPECIAL + DIGITS + BOXED
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    return word_level_tokenizer(words, pad="<pad>", eos="<eos>", unk="<pad>",
                                chat_template=("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                                               "{% if add_generation_prompt %}so {% endif %}"))


def qwen2_config(plan: Plan, tokenizer=None, max_positions: int | None = None):
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=plan.vocab_size, hidden_size=plan.hidden_size,
        intermediate_size=plan.intermediate_size, num_hidden_layers=plan.num_hidden_layers,
        num_attention_heads=plan.num_attention_heads,
        num_key_value_heads=plan.num_key_value_heads,
        max_position_embeddings=max_positions or 32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_cache=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer else 0,
        eos_token_id=tokenizer.eos_token_id if tokenizer else 1, bos_token_id=None)
    config._attn_implementation = "sdpa"
    return config


def build_model(plan: Plan, device: torch.device, seed: int, tokenizer=None,
                max_positions: int | None = None):
    """A Qwen2ForCausalLM of the plan's shape with random weights, initialized on `device`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(plan, tokenizer, max_positions))
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
    return model


def jsonl_rows(plan: Plan, seed: int = 0) -> list[dict]:
    """OpenR1-Math layout (luffy_fast.data.load_jsonl_samples): a chat prompt, one assistant
    trace ending in </think> and a boxed answer, and the ground truth."""
    rng = random.Random(seed)
    fillers = plan.vocab_size - len(SPECIAL + DIGITS + BOXED)
    rows = []
    for i in range(plan.num_rows):
        answer = rng.randrange(10)
        prompt = " ".join(["q"] + [str(rng.randrange(10)) for _ in range(plan.prompt_words - 1)])
        reasoning = " ".join(f"w{rng.randrange(fillers)}" for _ in range(plan.trace_words))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "target": [{"role": "assistant",
                                 "content": f"{reasoning} </think> \\boxed{{{answer}}}"}],
                     "reward_model": {"ground_truth": str(answer)},
                     "data_source": f"generated-{i}"})
    return rows


def train_config(plan: Plan, work: Path) -> dict:
    """The `luffy-fast train` run: ZeRO-2, bf16 on the GPU (fp32 on the CPU), HF generate
    rollouts with short responses, no evaluation, one checkpoint at the end."""
    dry = plan.label == "dry-run"
    return {
        "model": {"path": str(work / "model"), "attn_implementation": "sdpa",
                  "gradient_checkpointing": True, "precision": "fp32" if dry else "bf16"},
        "data": {"source": str(work / "train.jsonl"), "max_prompt_length": plan.prompt_words + 8,
                 "max_response_length": plan.max_response_length},
        "rollout": {"engine": "hf", "n_on": plan.n_on, "n_off": 1, "temperature": 1.0},
        "train": {"steps": plan.train_steps, "prompts_per_step": plan.prompts_per_step,
                  "mini_batch_size": plan.mini_batch_size, "token_budget": 4096,
                  "zero_stage": 2, "seed": 0, "loss_backend": "auto",
                  "cpu_threads": 1 if dry else 0},
        "optim": {"lr": 1e-5},
        "eval": {"every": 0},
        "output": {"dir": str(work / "train_run"), "save_every": 0, "keep_checkpoints": 1,
                   "tensorboard": False, "progress_bar": False},
    }


def prepare(plan: Plan, work: Path) -> dict:
    import yaml

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    device = device_for(plan)
    tokenizer = build_tokenizer(plan.vocab_size)
    model = build_model(plan, device, seed=0, tokenizer=tokenizer).to(dtype_of(plan))
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    rows = jsonl_rows(plan)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "train.yaml").write_text(yaml.safe_dump(train_config(plan, work), sort_keys=False))
    summary = {"plan": plan.label, "parameters": parameters, "vocab_size": plan.vocab_size,
               "tokenizer_size": len(tokenizer), "rows": len(rows), "dtype_saved": plan.dtype,
               "seconds": round(time.perf_counter() - start, 2)}
    emit(work, "prepare", summary)
    return summary


# --------------------------------------------------------------------------- check-train

def _metric(row: dict, name: str):
    """A metric by name, also under a namespace ("train/loss")."""
    if name in row:
        return row[name]
    for key, value in row.items():
        if key.endswith("/" + name):
            return value
    return None


def check_train(plan: Plan, work: Path) -> dict:
    path = work / "train_run" / "metrics.jsonl"
    if not path.exists():
        result = {"ok": False, "note": f"{path} missing: the train run did not log a step"}
        emit(work, "train", result)
        return result
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if _metric(r, "loss") is not None]
    losses = [_metric(r, "loss") for r in steps]
    norms = [_metric(r, "grad_norm") for r in steps]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses + norms)
    ok = finite and len(steps) == plan.train_steps and all(v is not None for v in norms)
    keep = ("loss", "grad_norm", "reward_on_policy", "reward_off_policy", "micro_batches",
            "peak_memory_mb", "peak_memory_mb/generate", "peak_memory_mb/update",
            "step_seconds", "tokens_per_second", "time/generate")
    result = {"ok": ok, "steps": len(steps), "expected_steps": plan.train_steps,
              "losses": losses, "grad_norms": norms,
              "per_step": [{k: _metric(r, k) for k in keep if _metric(r, k) is not None}
                           for r in steps],
              "checkpoint": (work / "train_run" / "checkpoints" / "latest").exists()}
    emit(work, "train", result)
    return result


# --------------------------------------------------------------------------- grad-parity

def parity_micro_batch(plan: Plan, work: Path, tokenizer, device: torch.device):
    """One micro-batch of the trainer's kind: each JSONL prompt with `n_on` random responses
    (policy samples of a random model are random tokens) and its trace, mixed advantages."""
    from luffy_fast.data import load_jsonl_samples
    from luffy_fast.rollout import Completion

    samples = load_jsonl_samples(work / "train.jsonl", tokenizer,
                                 plan.prompt_words + 8, plan.max_response_length)
    samples = samples[:plan.parity_groups]
    generator = torch.Generator().manual_seed(1)
    completions = [[Completion(torch.randint(0, plan.vocab_size, (plan.parity_response,),
                                             generator=generator).tolist(),
                               [0.0] * plan.parity_response, False)
                    for _ in range(plan.n_on)] for _ in samples]
    batch = assemble_groups(samples, completions, n_off=1)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch)) + 0.05  # none exactly zero
    micro = pack_micro_batch(batch, list(range(len(batch))))
    return micro.to(device), len(batch)


def grad_parity(plan: Plan, work: Path) -> dict:
    """The fused backends' gradient of every parameter on one micro-batch against the
    `reference` backend's (materialized logits, autograd), in the plan's dtype; on CUDA with
    liger-kernel installed, the triton backend's again with Liger's kernels in the model's layers
    (`model.liger_kernels`), as `triton+liger`."""
    from transformers import AutoModelForCausalLM

    from luffy_fast import LuffyLossConfig
    from luffy_fast.data import load_tokenizer

    device, dtype = device_for(plan), dtype_of(plan)
    tokenizer = load_tokenizer(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype,
                                                 attn_implementation="sdpa").to(device)
    micro, sequences = parity_micro_batch(plan, work, tokenizer, device)
    config = LuffyLossConfig.luffy(max_len=plan.parity_response, entropy_coef=0.001)
    module = PolicyWithFusedLoss(model, config, "reference")
    runs = [("reference", "reference"), ("torch", "torch"), ("triton", "triton")]
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        runs.append(("triton+liger", "triton"))  # last: the patches stay in the model
    kept: dict[str, tuple[float, dict]] = {}  # (loss, gradients) of reference and triton
    results = {}
    for backend, loss_backend in runs:
        module.loss_head.backend = loss_backend
        model.zero_grad(set_to_none=True)
        try:
            if backend == "triton+liger":
                from luffy_fast.model_loading import apply_liger_kernels

                apply_liger_kernels(model)
            start = time.perf_counter()
            loss, _stats = module(micro)
            loss.backward()
        except Exception as error:  # a backend that cannot run here: recorded, not fatal
            results[backend] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
            emit(work, "parity", {"backend": backend, **results[backend]})
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        grads = {n: p.grad.detach().float() for n, p in model.named_parameters()
                 if p.grad is not None}
        row = {"backend": backend, "loss": float(loss.detach()), "seconds": round(seconds, 3),
               "tokens": micro.num_tokens, "sequences": sequences, "dtype": plan.dtype,
               "finite": bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all())
                                                           for g in grads.values())}
        # the loss backends against the reference; Liger's layers against the same loss without
        # them (so the row isolates the layers), and against the reference for information
        against = "triton" if backend == "triton+liger" else "reference"
        if backend == "reference":
            row["grad_norm"] = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
            row["ok"] = row["finite"]
        elif against not in kept:
            row.update(ok=False, error=f"no {against} gradients to compare with")
        else:
            row.update(gradient_error(grads, float(loss), *kept[against]), against=against,
                       tolerance=plan.parity_tolerance)
            row["ok"] = row["finite"] and row["rel_l2_error"] <= plan.parity_tolerance
            if backend == "triton+liger" and "reference" in kept:
                row["reference_rel_l2_error"] = gradient_error(
                    grads, float(loss), *kept["reference"])["rel_l2_error"]
        if backend in ("reference", "triton"):
            kept[backend] = (float(loss.detach()), grads)
        del grads
        results[backend] = row
        emit(work, "parity", row)
    return {"ok": all(row.get("ok") for row in results.values()), "backends": results}


def gradient_error(grads: dict, loss: float, expected_loss: float, expected: dict) -> dict:
    """Relative L2 error of all the gradients together, the worst tensor's, and the loss's."""
    diff = sum(float((grads[n] - g).square().sum()) for n, g in expected.items())
    norm = sum(float(g.square().sum()) for g in expected.values())
    worst = max(((float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)), n)
                 for n, g in expected.items()), default=(0.0, ""))
    return {"rel_l2_error": math.sqrt(diff / max(norm, 1e-300)),
            "worst_tensor_rel_error": worst[0], "worst_tensor": worst[1],
            "loss_rel_error": abs(loss - expected_loss) / max(abs(expected_loss), 1e-30)}


# --------------------------------------------------------------------------- update: heads

class NaiveHead(torch.nn.Module):
    """Full [T, V] logits + the naive LUFFY loss (benchmarks/naive.py) in the place of the
    fused head; owns the LM-head weight like FusedLossHead."""

    def __init__(self, lm_head: torch.nn.Module, loss_config) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.loss_config = loss_config

    def forward(self, hidden, micro, logprobs_only: bool = False, with_entropy: bool = False):
        from benchmarks.naive import naive_luffy_loss

        loss = naive_luffy_loss(hidden, self.weight, micro.targets, micro.advantages,
                                micro.loss_mask, micro.off_policy_mask, micro.seq_ids,
                                self.loss_config, micro.old_logprobs)
        return loss, {}


class LigerHead(torch.nn.Module):
    """Liger-Kernel's LigerFusedLinearGRPOLoss as the head, configured as in
    benchmarks/liger_baseline.py (beta 0, no reference model, dr_grpo). Rows are equal-length
    (the micro-batches of this benchmark), so [T, H] is [B, L, H]."""

    def __init__(self, lm_head: torch.nn.Module, max_len: int, compiled: bool) -> None:
        super().__init__()
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        self.weight = lm_head.weight
        self.loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=compiled,
                                             loss_type="dr_grpo", max_completion_length=max_len,
                                             epsilon_low=0.2, epsilon_high=0.2)

    def forward(self, hidden, micro, logprobs_only: bool = False, with_entropy: bool = False):
        rows, length = len(micro.lengths), micro.lengths[0]
        if any(n != length for n in micro.lengths):
            raise ValueError("LigerHead: the benchmark's rows must have equal lengths")
        targets = micro.targets.clamp_min(0).view(rows, length)
        mask = micro.loss_mask.view(rows, length).to(hidden.dtype)
        advantages = micro.advantages.view(rows, length)[:, 0].to(hidden.dtype)
        loss, _metrics = self.loss(hidden.view(rows, length, -1), self.weight, targets, mask,
                                   advantages)
        return loss, {}


# --------------------------------------------------------------------------- update: memory

def live_tensor_bytes() -> int:
    """CPU stand-in for torch.cuda.memory_allocated: bytes of the distinct storages of every
    live tensor (parameters, gradients, optimizer state, anything kept between steps)."""
    seen, total = set(), 0
    gc.collect()
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: S112 - odd tensor subclasses without storage
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class Memory:
    """Allocated bytes and a step's peak: CUDA's allocator counters, or on the CPU the live
    tensors and the resident set's high-water mark (benchmarks/memory.py's CpuPeak)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if not self.cuda:
            from benchmarks.memory import CpuPeak

            self.cpu_peak = CpuPeak()

    def allocated(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return live_tensor_bytes()

    def start_peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return self.cpu_peak.start()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self.cpu_peak.stop()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------- update

def init_single_process(device: torch.device) -> None:
    """A world of one process for DeepSpeed (nccl on CUDA, gloo on the CPU)."""
    from luffy_fast.distributed import join_process_group

    join_process_group(device.type)


def synthetic_micro_batch(plan: Plan, rows: int, length: int, seed: int, device: torch.device):
    """`rows` sequences of `length` model tokens (prompt `prompt_length` + response), random
    tokens; half of them off-policy traces, advantages +-1 (every token carries a gradient)."""
    from luffy_fast.data import Sample
    from luffy_fast.rollout import Completion

    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, plan.vocab_size, (n,), generator=generator).tolist()

    response = length + 1 - plan.prompt_length
    if response < 1:
        raise ValueError(f"length {length} leaves no response after a {plan.prompt_length}-token "
                         "prompt")
    samples, completions = [], []
    groups = max(1, rows // 2)
    for _ in range(groups):
        samples.append(Sample(tokens(plan.prompt_length), "0", [tokens(response)]))
        completions.append([Completion(tokens(response), [0.0] * response, False)])
    batch = assemble_groups(samples, completions, n_off=1 if rows > 1 else 0)
    batch.advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(batch))])
    micro = pack_micro_batch(batch, list(range(len(batch))))
    assert micro.num_tokens == rows * length, (micro.num_tokens, rows, length)
    return micro.to(device)


def build_engine(plan: Plan, impl: str, device: torch.device):
    """The policy (random weights, gradient checkpointing) in the trainer's module with the
    impl's head, on a DeepSpeed ZeRO-2 engine with the trainer's DeepSpeed config."""
    import deepspeed

    from luffy_fast import LuffyLossConfig
    from luffy_fast.train_config import config_from_dict

    init_single_process(device)
    model = build_model(plan, device, seed=0, max_positions=max(32768, 2 * plan.max_length))
    head_note = "PolicyWithFusedLoss, backend auto"
    if impl == "fused_liger":
        from luffy_fast.model_loading import apply_liger_kernels

        apply_liger_kernels(model)
        head_note += ", Liger's RMSNorm/SwiGLU/RoPE in the layers (model.liger_kernels)"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_config = LuffyLossConfig.luffy(max_len=plan.max_length)
    if impl == "fused_half":
        loss_config = loss_config.replace(logits_dtype="input")
        head_note += ", logits_dtype input (16-bit kept logits)"
    module = PolicyWithFusedLoss(model, loss_config)
    if impl == "naive":
        module.loss_head = NaiveHead(model.get_output_embeddings(), loss_config)
        head_note = "PolicyWithFusedLoss with its head swapped for full logits + naive loss"
    elif impl == "liger":
        compiled = device.type == "cuda" and os.environ.get("LIGER_COMPILED", "1") == "1"
        module.loss_head = LigerHead(model.get_output_embeddings(), plan.max_length, compiled)
        head_note = f"LigerFusedLinearGRPOLoss (compiled={compiled})"
    bf16 = plan.dtype == "bfloat16"
    config = config_from_dict({"train": {"zero_stage": 2}, "optim": {"lr": 1e-6}})
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(config, bf16))
    return engine, head_note


class EngineSlot:
    """The engine being measured, held here alone so that a failed one is dropped before its
    replacement is built: a ZeRO-2 engine is not reused after a step that failed half-way, and
    two engines of the policy at once would leave less memory than the head is measured in.
    A renewal's row records how many of the engines built before were still alive when the
    new one was built (0 expected; on the H200 on 2026-11-27 a rebuilt Liger engine started
    with 20.2 GiB more allocated than the first), and if any, what held them."""

    def __init__(self, plan: Plan, impl: str, device: torch.device, memory: Memory,
                 work: Path, stage: str) -> None:
        self.plan, self.impl, self.device, self.memory = plan, impl, device, memory
        self.work, self.stage = work, stage
        self._built: weakref.WeakSet = weakref.WeakSet()  # this slot's engines not yet collected
        self.engine, self.head_note = self._build()

    def _build(self):
        engine, head_note = build_engine(self.plan, self.impl, self.device)
        self._built.add(engine)
        return engine, head_note

    def renew(self, kind: str = "renew") -> None:
        """Drop the engine, free its memory and the compile cache (Liger's compiled loss), and
        build a new one; a `kind` row records it. Call it outside an `except` block, where the
        error's frames no longer hold the old engine."""
        release_engine(self.engine)  # DeepSpeed's hooks would keep it alive (the H200 run's case)
        self.engine = None
        torch._dynamo.reset()
        self.memory.free()
        survivors = list(self._built)
        alive = {"live_engines_at_build": len(survivors)}
        if survivors:  # what still holds them (frames, dicts, ...), for the row
            alive["held_by"] = sorted({type(referrer).__name__ for engine in survivors
                                       for referrer in gc.get_referrers(engine)
                                       if referrer is not survivors})
        del survivors
        self.engine = self._build()[0]
        emit(self.work, self.stage, {"kind": kind, "impl": self.impl, **alive,
                                     "allocated_mb": self.memory.allocated() / MIB})


def with_one_retry(slot: EngineSlot, run: Callable[[Any, int], str],
                   on_renew: Callable[[], None] = lambda: None) -> str:
    """`run(engine, attempt)` measures and returns "ok", "oom" or "error". Anything but memory
    gets one retry on a fresh engine: Liger's compiled loss failed in torch.compile when the
    micro-batch's row count changed (torch 2.11, InternalTorchDynamoError, on an H200 on
    2026-11-27), while a fresh engine ran every size. The outcome of the last attempt."""
    outcome = run(slot.engine, 0)
    if outcome == "error":
        slot.renew()
        on_renew()
        outcome = run(slot.engine, 1)
    return outcome


# Tests only: a micro-batch of at least this many tokens fails as if out of memory (after its
# forward), so the out-of-memory path (sizes skipped, engine rebuilt, probes ended) runs on a CPU.
FAKE_OOM_TOKENS = int(os.environ.get("BENCH_FAKE_OOM_AT", "0") or 0)
# Tests only: the first step at exactly this many tokens raises another error once (the retry on
# a fresh engine then runs).
FAKE_ERROR_TOKENS = int(os.environ.get("BENCH_FAKE_ERROR_ONCE_AT", "0") or 0)
_faked_errors: set[int] = set()


def update_step(engine, micro) -> float:
    loss, _stats = engine(micro)
    if FAKE_OOM_TOKENS and micro.num_tokens >= FAKE_OOM_TOKENS:
        raise torch.cuda.OutOfMemoryError(f"simulated (BENCH_FAKE_OOM_AT={FAKE_OOM_TOKENS})")
    if micro.num_tokens == FAKE_ERROR_TOKENS and FAKE_ERROR_TOKENS not in _faked_errors:
        _faked_errors.add(FAKE_ERROR_TOKENS)
        raise RuntimeError(f"simulated (BENCH_FAKE_ERROR_ONCE_AT={FAKE_ERROR_TOKENS})")
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def time_size(engine, micro, memory: Memory, plan: Plan, tokens: int,
              allocated_after: list[tuple[int, int]]) -> dict:
    """One warm-up step, then plan.timed_steps timed steps on `micro`: tokens/s and peak memory;
    appends the allocated bytes after every timed step to `allocated_after`."""
    warm = time.perf_counter()
    update_step(engine, micro)  # warm-up: optimizer state, kernel compiles, autotuning
    warm = time.perf_counter() - warm
    times, losses = [], []
    for _ in range(plan.timed_steps):
        before = memory.start_peak()
        began = time.perf_counter()
        losses.append(update_step(engine, micro))
        if micro.targets.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        peak = memory.peak()
        allocated_after.append((tokens, memory.allocated()))
    median = statistics.median(times)
    return {"tokens_per_second": tokens / median, "median_seconds": median,
            "seconds": [round(t, 4) for t in times], "warmup_seconds": round(warm, 3),
            "peak_mb": peak / MIB, "step_extra_mb": (peak - before) / MIB,
            "loss_finite": all(math.isfinite(v) for v in losses)}


def run_update(plan: Plan, impl: str, work: Path) -> None:
    """Throughput at each micro-batch size, allocated memory after every step, then the
    single-sequence probes. Rows go to results/update-<impl>.jsonl as they are measured.

    Sizes ascend, so the first size that fails (out of memory) ends the throughput part; the
    probes then run on a fresh engine, since a ZeRO-2 engine is not reused after a step that
    failed half-way through its gradient reduction.
    """
    device = device_for(plan)
    stage = f"update-{impl}"
    start = time.perf_counter()
    memory = Memory(device)
    slot = EngineSlot(plan, impl, device, memory, work, stage)
    first_allocated = memory.allocated()
    emit(work, stage, {"kind": "setup", "impl": impl, "head": slot.head_note,
                       "seconds": round(time.perf_counter() - start, 2), "dtype": plan.dtype,
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "allocated_mb": first_allocated / MIB,
                       "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
    allocated_after: list[tuple[int, int]] = []  # (micro-batch tokens, bytes after the step)
    failed = None
    for size_index, tokens in enumerate(plan.micro_batch_tokens):
        rows = tokens // plan.row_length
        if failed is not None:
            emit(work, stage, {"kind": "throughput", "impl": impl, "tokens": tokens, "rows": rows,
                               "status": "skipped", "note": f"{failed} tokens already failed"})
            continue
        measure = functools.partial(measure_size, plan, impl, work, memory, device, size_index,
                                    allocated_after)
        # after a renewal the growth check covers the fresh engine only
        if with_one_retry(slot, measure, on_renew=allocated_after.clear) != "ok":
            failed = tokens
        memory.free()
    if allocated_after:
        emit(work, stage, growth_row(plan, impl, device, allocated_after))
    if impl in PROBED:
        if failed is not None:  # the probes need an engine that did not fail
            slot.renew("rebuild")
        run_probes(plan, impl, work, slot, memory, device)


def measure_size(plan: Plan, impl: str, work: Path, memory: Memory, device: torch.device,
                 size_index: int, allocated_after: list[tuple[int, int]], engine,
                 attempt: int) -> str:
    """The timed steps at the plan's `size_index`-th micro-batch size, their row emitted: "ok",
    "oom" or "error"."""
    stage = f"update-{impl}"
    tokens = plan.micro_batch_tokens[size_index]
    rows = tokens // plan.row_length
    micro = synthetic_micro_batch(plan, rows, plan.row_length, seed=size_index, device=device)
    try:
        row = time_size(engine, micro, memory, plan, tokens, allocated_after)
    except Exception as error:
        return failure_row(work, stage, error, {"kind": "throughput", "impl": impl,
                                                "tokens": tokens, "rows": rows,
                                                "attempt": attempt})
    finally:
        del micro
    emit(work, stage, {"kind": "throughput", "impl": impl, "tokens": tokens, "rows": rows,
                       "row_length": plan.row_length, "status": "ok",
                       **({"attempt": attempt} if attempt else {}), **row})
    return "ok"


def failure_row(work: Path, stage: str, error: BaseException, row: dict) -> str:
    """Emits `row` for a failed step, with its status ("oom" or "error") and the error, whose
    traceback is printed unless it is out of memory; returns the status."""
    status = "oom" if is_out_of_memory(error) else "error"
    emit(work, stage, {**row, "status": status, "error": f"{type(error).__name__}: {error}"[:300]})
    if status == "error":
        traceback.print_exc()
    return status


def growth_row(plan: Plan, impl: str, device: torch.device,
               allocated_after: list[tuple[int, int]]) -> dict:
    """Allocated memory after each timed step, judged over steps of one size (across sizes the
    batch itself differs)."""
    after = [a for _, a in allocated_after]
    same_size = max((max(a for t, a in allocated_after if t == size)
                     - next(a for t, a in allocated_after if t == size))
                    for size in {t for t, _ in allocated_after})
    return {"kind": "growth", "impl": impl,
            "allocated_after_step_mb": [round(a / MIB, 3) for a in after],
            "growth_mb": (max(after) - after[0]) / MIB, "same_size_growth_mb": same_size / MIB,
            "final_minus_first_mb": (after[-1] - after[0]) / MIB,
            "tolerance_mb": plan.growth_tolerance_mb,
            "ok": same_size / MIB <= plan.growth_tolerance_mb,
            "method": "cuda.memory_allocated" if device.type == "cuda"
            else "live CPU tensor storages"}


def run_probes(plan: Plan, impl: str, work: Path, slot: EngineSlot, memory: Memory,
               device: torch.device) -> None:
    """One full update step on a single sequence of each probe length, ascending, until one
    runs out of memory, the limit. Any other error (Liger's compiled loss at a new shape, say)
    is retried once on a fresh engine; a second one ends the probes without a limit found
    (`limit_reached` false: the longest is then a lower bound, not the head's limit)."""
    stage = f"update-{impl}"
    longest, limit_reached = 0, False
    for index, length in enumerate(plan.probe_lengths):
        outcome = with_one_retry(slot, functools.partial(probe, plan, impl, work, memory,
                                                         device, length, index))
        if outcome != "ok":
            limit_reached = outcome == "oom"
            break
        longest = length
    emit(work, stage, {"kind": "longest", "impl": impl, "longest": longest,
                       "limit_reached": limit_reached, "probed_up_to": plan.probe_lengths[-1],
                       **({} if limit_reached or longest == plan.probe_lengths[-1] else
                          {"note": "stopped by an error other than memory"})})


def probe(plan: Plan, impl: str, work: Path, memory: Memory, device: torch.device,
          length: int, index: int, engine, attempt: int) -> str:
    """One probe's update step on a single `length`-token sequence, its row emitted: "ok",
    "oom" or "error"."""
    stage, micro = f"update-{impl}", None
    try:
        micro = synthetic_micro_batch(plan, 1, length, seed=100 + index, device=device)
        before = memory.start_peak()
        began = time.perf_counter()
        loss = update_step(engine, micro)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        peak = memory.peak()
    except Exception as error:
        return failure_row(work, stage, error, {"kind": "probe", "impl": impl, "length": length,
                                                "attempt": attempt})
    finally:
        del micro
        memory.free()
    emit(work, stage, {"kind": "probe", "impl": impl, "length": length, "status": "ok",
                       "seconds": round(seconds, 3), "peak_mb": peak / MIB,
                       "step_extra_mb": (peak - before) / MIB, "loss_finite": math.isfinite(loss),
                       **({"attempt": attempt} if attempt else {})})
    return "ok"


# --------------------------------------------------------------------------- report

TARGETS = {"longest_vs_naive": 2.0, "tokens_per_second_vs_naive": 1.1,
           "tokens_per_second_vs_liger": 3.0}


def _fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def summarize(plan: Plan, work: Path) -> dict:
    """Everything measured, the per-impl numbers and the target ratios, as one dict."""
    impls: dict[str, dict] = {}
    for impl in IMPLS:
        rows = read_rows(work, f"update-{impl}")
        through = {r["tokens"]: r for r in rows if r.get("kind") == "throughput"}
        longest = next((r for r in rows if r.get("kind") == "longest"), None)
        probes = [r for r in rows if r.get("kind") == "probe"]
        if longest is None and probes:  # cut short: the longest probe that passed so far
            passed = [r["length"] for r in probes if r["status"] == "ok"]
            oom = any(r["status"] == "oom" for r in probes)  # a limit found before the cut
            longest = {"longest": max(passed, default=0), "limit_reached": oom,
                       "note": "probes cut short (stage timeout)"}
        impls[impl] = {
            "setup": next((r for r in rows if r.get("kind") == "setup"), None),
            "throughput": {str(k): v for k, v in sorted(through.items())},
            "growth": next((r for r in rows if r.get("kind") == "growth"), None),
            "probes": probes, "longest": longest, "ran": bool(rows)}

    def tps(impl: str) -> float | None:
        row = impls[impl]["throughput"].get(str(plan.target_tokens))
        return row["tokens_per_second"] if row and row.get("status") == "ok" else None

    def longest_of(impl: str) -> tuple[int | None, bool]:
        row = impls[impl]["longest"]
        return (row["longest"], not row["limit_reached"]) if row else (None, False)

    checks = []
    fused_long, fused_lower_bound = longest_of("fused")
    naive_long, naive_lower_bound = longest_of("naive")
    ratio = None
    if fused_long is not None and naive_long:
        ratio = fused_long / naive_long
    note = ""
    if naive_lower_bound:  # no limit found (cut short, an error, or every length fitted)
        note = ("naive's limit was not found (no probe ran out of memory): the ratio is an "
                "upper bound, no verdict" + ("; probe longer (BENCH_MAX_SEQ)"
                                             if naive_long == plan.probe_lengths[-1] else ""))
    elif fused_lower_bound:
        note = "fused never ran out of memory: the ratio is a lower bound"
    if naive_long == 0 and not naive_lower_bound:
        note = f"naive failed even at {_fmt_tokens(plan.probe_lengths[0])}"
    checks.append({"name": "longest sequence, fused / naive", "value": ratio,
                   "target": TARGETS["longest_vs_naive"], "note": note,
                   # fused's own may be a lower bound (that only strengthens a pass); naive's
                   # must be its limit, else the ratio may be too high
                   "ok": not naive_lower_bound and (
                       (ratio is not None and ratio >= TARGETS["longest_vs_naive"])
                       # naive < the first probe: fused at twice that length or more is >= 2x
                       or (naive_long == 0 and (fused_long or 0) >= 2 * plan.probe_lengths[0]))})
    # the default head, then the options where they ran
    heads = ["fused"] + [head for head in ("fused_half", "fused_liger") if impls[head]["ran"]]
    for head, (other, key) in ((head, pair) for head in heads for pair in (
            ("naive", "tokens_per_second_vs_naive"), ("liger", "tokens_per_second_vs_liger"))):
        value = tps(head) / tps(other) if tps(head) and tps(other) else None
        checks.append({"name": f"tokens/s at {_fmt_tokens(plan.target_tokens)}, {head} / {other}",
                       "value": value, "target": TARGETS[key],
                       "ok": value is not None and value >= TARGETS[key]})
    growth = impls["fused"]["growth"]
    checks.append({"name": "allocated growth over steps, fused (MiB)",
                   "value": growth.get("same_size_growth_mb", growth["growth_mb"]) if growth
                   else None,
                   "target": f"<= {plan.growth_tolerance_mb:g}",
                   "ok": bool(growth and growth["ok"])})
    train = (read_rows(work, "train") or [None])[-1]
    checks.append({"name": "train run: losses and grad norms finite",
                   "value": (f"{train['steps']}/{train['expected_steps']} steps"
                             if train and "steps" in train else None),
                   "target": "all finite", "ok": bool(train and train["ok"])})
    parity = {r["backend"]: r for r in read_rows(work, "parity")}
    for backend, against in (("triton", "reference"), ("torch", "reference"),
                             ("triton+liger", "triton")):
        row = parity.get(backend)
        if backend == "triton+liger" and row is None:  # not run: no GPU, or no liger-kernel
            continue
        checks.append({"name": f"gradient, {backend} vs {against} (rel. L2)",
                       "value": row.get("rel_l2_error") if row else None,
                       "target": f"<= {plan.parity_tolerance:g}",
                       "ok": bool(row and row.get("ok"))})
    from benchmarks.checkpoint_fit import fit_checks, summarize_fit

    fit = summarize_fit(work, IMPLS)  # each head at the fewest checkpointed layers that fit
    checks += fit_checks(fit, plan.target_tokens, TARGETS)
    return {"plan": asdict(plan), "targets": TARGETS, "checks": checks, "impls": impls,
            "fit": fit, "prepare": (read_rows(work, "prepare") or [None])[-1], "train": train,
            "parity": parity}


def format_table(plan: Plan, summary: dict) -> str:
    lines = [f"luffy-fast trainer check ({plan.label}; {plan.num_hidden_layers} layers, "
             f"hidden {plan.hidden_size}, vocab {plan.vocab_size}, {plan.dtype}, ZeRO-2, "
             "gradient checkpointing)", ""]
    sizes = [_fmt_tokens(t) for t in plan.micro_batch_tokens]
    head = f"{'impl':<11}" + "".join(f"{s + ' tok/s':>14}{s + ' peak GiB':>14}" for s in sizes)
    lines += [head + f"{'longest seq':>13}{'growth MiB':>12}"]
    for impl in IMPLS:
        info = summary["impls"][impl]
        cells = ""
        for tokens in plan.micro_batch_tokens:
            row = info["throughput"].get(str(tokens))
            if row and row.get("status") == "ok":
                cells += f"{row['tokens_per_second']:>14.0f}{row['peak_mb'] / 1024:>14.2f}"
            else:
                cells += f"{(row or {}).get('status', '-'):>14}{'-':>14}"
        longest = info["longest"]
        long_text = "-" if not longest else (
            ("≥" if not longest["limit_reached"] else "") + _fmt_tokens(longest["longest"]))
        growth = (f"{info['growth'].get('same_size_growth_mb', info['growth']['growth_mb']):.2f}"
                  if info["growth"] else "-")
        lines.append(f"{impl:<11}{cells}{long_text:>13}{growth:>12}")
    from benchmarks.checkpoint_fit import format_fit_table

    lines += format_fit_table(summary.get("fit", {}), plan.target_tokens)
    lines += ["", f"{'check':<46}{'value':>12}{'target':>12}  result"]
    for check in summary["checks"]:
        value = check["value"]
        text = f"{value:.3g}" if isinstance(value, float) else str(value if value is not None
                                                                     else "-")
        target = check["target"]
        target = f">= {target:g}" if isinstance(target, float) else str(target)
        verdict = "PASS" if check["ok"] else "MISS"
        if plan.label == "dry-run" and "/" in check["name"] and "fused" in check["name"]:
            verdict += " (dry run: toy sizes, not a measurement)"
        lines.append(f"{check['name']:<46}{text:>12}{target:>12}  {verdict}"
                     + (f"  [{check['note']}]" if check.get("note") else ""))
    return "\n".join(lines)


def report(plan: Plan, work: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(plan, work)
    summary["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    summary["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                         and plan.label != "dry-run" else "cpu")
    (out / "trainer_check.json").write_text(json.dumps(summary, indent=1))
    table = format_table(plan, summary)
    (out / "trainer_check.txt").write_text(table + "\n")
    print(table)
    return summary


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("prepare", "check-train", "grad-parity", "update",
                                          "fit", "report"))
    parser.add_argument("--work", required=True, type=Path,
                        help="working folder (model, data, run, results/)")
    parser.add_argument("--out", type=Path, help="report: where the JSON and the table go")
    parser.add_argument("--impl", choices=IMPLS, help="update, fit: which loss head")
    parser.add_argument("--dry-run", action="store_true",
                        default=os.environ.get("BENCH_DRY_RUN", "0") == "1",
                        help="toy sizes, fp32, on the CPU (also BENCH_DRY_RUN=1)")
    args = parser.parse_args(argv)
    plan = plan_for(args)
    if args.stage == "prepare":
        prepare(plan, args.work)
    elif args.stage == "check-train":
        return 0 if check_train(plan, args.work)["ok"] else 1
    elif args.stage == "grad-parity":
        return 0 if grad_parity(plan, args.work)["ok"] else 1
    elif args.stage == "update":
        if not args.impl:
            parser.error("update needs --impl")
        run_update(plan, args.impl, args.work)
    elif args.stage == "fit":  # benchmarks/checkpoint_fit.py
        if not args.impl:
            parser.error("fit needs --impl")
        from benchmarks.checkpoint_fit import run_fit

        run_fit(plan, args.impl, args.work)
    else:
        if args.out is None:
            parser.error("report needs --out")
        report(plan, args.work, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
