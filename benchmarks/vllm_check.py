"""The vLLM rollout engine on one GPU: the Python half of gpu_vllm_check.sh.

    python -m benchmarks.vllm_check prepare --work DIR            # a random Qwen2 + tokenizer
    python -m benchmarks.vllm_check cycle --level 2 --work DIR    # one engine, sleep level 2
    python -m benchmarks.vllm_check cycle --level 1 --work DIR    # the same at level 1
    python -m benchmarks.vllm_check restart --work DIR            # start, close, start again
    python -m benchmarks.vllm_check report --work DIR --out OUT   # one JSON, the table last

Each stage runs in its own process, with an initialized process group as the trainer has (nccl,
world 1), and the engine at tensor_parallel_size 1 (luffy_fast/rollout/vllm.py). `cycle`:
start; generate; score fixed continuations against transformers (same weights); perturb the
transformers copy (the engine's log-probs must now be far off); sleep and measure the device
memory freed (driver-level free memory: vLLM's allocations bypass torch's allocator); allocate
45 % of the GPU in the trainer and free it (with gpu_memory_utilization 0.6 this fits only if the
sleep really freed the engine's memory); sync the perturbed weights, wake, score again (now
close); a second sleep/sync/wake; close, and check the process group is still initialized and
the memory came back. `restart`: close, then a second sleep-mode engine in the same process
(vLLM's sleep allocator is one per process: it works only if close released everything).

Nothing is downloaded. BENCH_DRY_RUN=1 (or --dry-run) runs every stage at toy size on the CPU
with sleep level 0 (vLLM has no sleep mode there), to test the plumbing. Every stage writes
DIR/results/<stage>.json as it goes, so a stage cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

GIB = 2**30
PROMPTS = [[2, 3, 4, 5, 6, 7], [2, 8, 9], [3, 10, 11, 12, 13], [4, 5, 6]]  # the toy vocabulary
CONTINUATIONS = [[14, 15, 16, 17, 18, 19, 12, 13], [17, 3, 8], [9, 4, 11, 2], [19, 18]]


def dry_run() -> bool:
    return os.environ.get("BENCH_DRY_RUN") == "1" or not torch.cuda.is_available()


class Results:
    """DIR/results/<stage>.json, rewritten after every measurement."""

    def __init__(self, work: Path, stage: str) -> None:
        self.path = work / "results" / f"{stage}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.values: dict = {"stage": stage, "dry_run": dry_run()}
        self.add()

    def add(self, **values) -> None:
        self.values.update(values)
        self.path.write_text(json.dumps(self.values, indent=1))
        for key, value in values.items():
            print(f"  {key}: {value}", flush=True)


def init_trainer_group() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo" if dry_run() else "nccl")


def free_gib() -> float:
    if dry_run():
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GIB


def prepare(work: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from luffy_fast.toy.model import build_tokenizer

    tokenizer = build_tokenizer(5)
    small = dry_run()
    config = Qwen2Config(  # Qwen2.5-0.5B's shape with a short vocabulary (random weights)
        vocab_size=len(tokenizer), hidden_size=64 if small else 896,
        intermediate_size=128 if small else 4864, num_hidden_layers=2 if small else 24,
        num_attention_heads=2 if small else 14, num_key_value_heads=1 if small else 2,
        max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    (work / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    print(f"  model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


def trainer_policy(work: Path):
    from transformers import AutoModelForCausalLM

    device = "cpu" if dry_run() else "cuda"
    return AutoModelForCausalLM.from_pretrained(work / "model", torch_dtype=torch.float32).to(device)


def gap(engine, policy) -> float:
    """Max |engine - transformers| log-prob over the fixed continuations."""
    worst = 0.0
    for prompt, continuation, scored in zip(PROMPTS, CONTINUATIONS,
                                            engine.score(PROMPTS, CONTINUATIONS)):
        ids = torch.tensor([prompt + continuation], device=policy.device)
        with torch.no_grad():
            logits = policy(ids).logits[0, len(prompt) - 1:-1].float()
        expected = logits.log_softmax(-1).gather(
            -1, torch.tensor(continuation, device=policy.device)[:, None])[:, 0].cpu()
        worst = max(worst, float((torch.tensor(scored) - expected).abs().max()))
    return worst


def engine_options(level: int):
    from luffy_fast.rollout.vllm_config import VLLMConfig

    return VLLMConfig(sleep_level=0 if dry_run() else level, max_model_len=128,
                      gpu_memory_utilization=None if dry_run() else 0.6,
                      dtype=os.environ.get("VLLM_CHECK_DTYPE", "float32"), sync_bucket_mb=64)


def cycle(work: Path, level: int) -> None:
    from luffy_fast.rollout.base import SamplingParams
    from luffy_fast.rollout.vllm import VLLMRolloutEngine
    from luffy_fast.rollout.weights import gathered_named_parameters

    results = Results(work, f"cycle_level{level}")
    init_trainer_group()
    policy = trainer_policy(work)
    free_start = free_gib()
    engine = VLLMRolloutEngine(work / "model", engine_options(level), seed=0)
    results.add(start_seconds=engine.start_seconds, engine_gib=free_start - free_gib(),
                sleep_level=engine.sleep_level)
    groups = engine.generate(PROMPTS, n=4, params=SamplingParams(max_new_tokens=32, seed=1))
    results.add(generated_tokens=sum(len(c.token_ids) for g in groups for c in g),
                gap_same_weights=gap(engine, policy))
    with torch.no_grad():  # the "optimizer step": every parameter moves
        generator = torch.Generator(device=policy.device).manual_seed(1)
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator,
                                       device=policy.device) * 0.05)
    results.add(gap_before_sync=gap(engine, policy))
    for round_ in (1, 2):
        before = free_gib()
        engine.sleep()
        results.add(**{f"sleep{round_}_freed_gib": free_gib() - before,
                       f"sleep{round_}_seconds": engine.metrics().get("sleep_seconds", 0.0)})
        if round_ == 1 and not dry_run():
            total = torch.cuda.mem_get_info()[1]
            block = torch.empty(int(0.45 * total), dtype=torch.uint8, device="cuda")
            block.fill_(1)
            del block
            torch.cuda.empty_cache()
            results.add(allocated_45_percent=True)
        engine.sync_weights(gathered_named_parameters(policy, bucket_mb=64))
        engine.wake()
        results.add(**{f"gap_after_sync{round_}": gap(engine, policy),
                       f"sync{round_}_metrics": engine.metrics()})
    groups = engine.generate(PROMPTS, n=4, params=SamplingParams(max_new_tokens=32, seed=1))
    results.add(generated_tokens_after=sum(len(c.token_ids) for g in groups for c in g))
    engine.close()
    results.add(group_kept=torch.distributed.is_initialized(),
                returned_after_close_gib=free_gib() - free_start, ok=True)


def restart(work: Path) -> None:
    from luffy_fast.rollout.base import SamplingParams
    from luffy_fast.rollout.vllm import VLLMRolloutEngine

    results = Results(work, "restart")
    init_trainer_group()
    for attempt in (1, 2):
        engine = VLLMRolloutEngine(work / "model", engine_options(2), seed=0)
        groups = engine.generate(PROMPTS, n=2, params=SamplingParams(max_new_tokens=8, seed=1))
        engine.sleep()
        engine.close()
        results.add(**{f"engine{attempt}_tokens": sum(len(c.token_ids) for g in groups for c in g),
                       f"engine{attempt}_start_seconds": engine.start_seconds})
    results.add(group_kept=torch.distributed.is_initialized(), ok=True)


def report(work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stages = {path.stem: json.loads(path.read_text())
              for path in sorted((work / "results").glob("*.json"))}
    (out / "vllm_check.json").write_text(json.dumps(stages, indent=1))
    keys = ("ok", "start_seconds", "engine_gib", "sleep1_freed_gib", "allocated_45_percent",
            "gap_same_weights", "gap_before_sync", "gap_after_sync1", "gap_after_sync2",
            "group_kept", "returned_after_close_gib", "error")
    lines = [f"{'':26}" + "".join(f"{name[:18]:>20}" for name in stages)]
    for key in keys:
        cells = [stages[name].get(key, "") for name in stages]
        cells = [f"{c:.3g}" if isinstance(c, float) else str(c)[:18] for c in cells]
        lines.append(f"{key:26}" + "".join(f"{c:>20}" for c in cells))
    (out / "vllm_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_check")
    parser.add_argument("stage", choices=("prepare", "cycle", "restart", "report"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("gpu_results"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["BENCH_DRY_RUN"] = "1"
    start = time.perf_counter()
    try:
        if args.stage == "prepare":
            prepare(args.work)
        elif args.stage == "cycle":
            cycle(args.work, args.level)
        elif args.stage == "restart":
            restart(args.work)
        else:
            report(args.work, args.out)
    except Exception as error:  # recorded for the report, then the stage fails
        traceback.print_exc()
        name = {"cycle": f"cycle_level{args.level}"}.get(args.stage, args.stage)
        path = args.work / "results" / f"{name}.json"
        if path.exists():
            values = json.loads(path.read_text())
            values["error"] = f"{type(error).__name__}: {error}"[:500]
            path.write_text(json.dumps(values, indent=1))
        sys.exit(1)
    print(f"  {args.stage}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
