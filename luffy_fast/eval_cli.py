"""`luffy-fast eval`: k samples per problem from a model directory, verified by math-verify,
avg@k and pass@k per data source with the macro average (luffy_fast/evaluation.py).

    luffy-fast eval --model runs/luffy/checkpoints/best/step-000300/hf \\
        --data aime24.parquet math500.jsonl --n 32 --temperature 0.6 --max-new-tokens 8192

Prompts as the official evaluation builds them: the system prompt removed, the model's own chat
template applied. Generation with vLLM when it is installed and a GPU is present (or
`--engine vllm`), transformers `generate` otherwise. Every input is checked before the model
loads; the table is printed. With `--output`, the generations are written there as they come
(`--save-every`), so that `--resume` continues an interrupted eval (luffy_fast/eval_store.py),
and `results.json` at the end.
The files are read by luffy_fast/eval_data.py (the official layout, or problem/question with
answer/solution).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from luffy_fast.errors import ConfigError
from luffy_fast.eval_store import EvalStore, problems_per_chunk
from luffy_fast.evaluation import format_table, generate_and_score, summarize
from luffy_fast.metrics import ProgressLog
from luffy_fast.reward_pool import MAX_TIMEOUT
from luffy_fast.rollout.base import RolloutEngine, SamplingParams
from luffy_fast.run_files import claim_run_dir, ensure_writable_dir, warn


def add_eval_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="avg@k / pass@k of a model on evaluation files",
        description="Sample --n responses per problem, verify them with math-verify, print "
                    "avg@k and pass@k per data source and their macro average.")
    parser.add_argument("--model", required=True, help="a transformers model directory")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE",
                        help="Parquet / JSONL files or folders: the official layout (prompt, "
                             "reward_model.ground_truth, data_source) or problem/question with "
                             "answer/solution (data source: the file's name, or its folder's for "
                             "generic names such as test.jsonl)")
    parser.add_argument("--n", type=int, default=1,
                        help="samples per problem, the k of avg@k and pass@k (default: 1; the paper's "
                             "AIME and AMC: 32)")
    parser.add_argument("--temperature", type=float, default=0.6,
                        help="sampling temperature (default: 0.6; the official eval's)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=8192,
                        help="response length limit (default: 8192)")
    parser.add_argument("--output", default=None,
                        help="folder for results.json and generations.jsonl (default: none)")
    parser.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto",
                        help="auto (the default): vllm on a GPU where it is installed, else hf")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template replacing the model's (e.g. "
                             "configs/templates/qwen2.5_math_think.jinja); default: the model's own")
    parser.add_argument("--question-key", default=None, help="the question column, if unusual")
    parser.add_argument("--answer-key", default=None, help="the answer column, if unusual")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="hf engine: sequences per call (default: 64)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="vllm engine: GPUs the model is split over (default: 1)")
    parser.add_argument("--reward-workers", type=int, default=None,
                        help="scoring processes (default: one per CPU core; 0: in-process)")
    parser.add_argument("--reward-timeout", type=float, default=10.0,
                        help="seconds per answer before it scores 0 (default: 10)")
    parser.add_argument("--save-every", type=int, default=4096, metavar="SAMPLES",
                        help="sample in chunks of SAMPLES samples (whole problems; chunk k with "
                             "--seed + k), each written to --output once scored, so that an "
                             "interrupted eval loses only the chunk under way (default: 4096)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted eval in --output (same settings)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the eval files already in --output")
    parser.add_argument("--source", default=None, metavar="NAME",
                        help="name every problem's data source NAME (one benchmark split over "
                             "several files, e.g. AIME2025's I and II); default: per row or file")
    table = commands.add_parser(
        "table", help="one table from several eval runs (the paper's avg column)",
        description="Each data source's avg@n at its own run's n (avg@32 for AIME, avg@1 = "
                    "pass@1 for MATH-500) from several `eval --output` folders, and their macro "
                    "average.")
    table.add_argument("results", nargs="+", metavar="RESULTS",
                       help="eval --output folders, or the results.json files in them")


def run_table(args: argparse.Namespace) -> int:
    """`luffy-fast table`: every run's results.json read and checked, then one table."""
    from luffy_fast.evaluation import combined_table

    runs = []
    for item in args.results:
        path = Path(item) / "results.json" if Path(item).is_dir() else Path(item)
        if not path.is_file():
            raise ConfigError(f"table: no results.json at {str(item)!r} (an eval --output folder)")
        runs.append((str(path), read_results(path)))
    print(combined_table(runs))
    return 0


def read_results(path: Path) -> dict:
    """An eval run's results.json, or a ConfigError naming it."""
    import json

    try:
        results = json.loads(path.read_text())
        n, sources = results["n"], results["sources"]
        complete = bool(sources) and all({"problems", f"avg@{n}"} <= set(entry)
                                         for entry in sources.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if not complete:
        raise ConfigError(f"table: {str(path)!r} is not an eval results.json (n, and sources "
                          f"with their problems and avg@n)")
    return results


def check_arguments(args: argparse.Namespace) -> None:
    """Everything a user can get wrong, before any model loads."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        hint = (f"; a checkpoint's model is in its hf/ folder: --model {model / 'hf'}"
                if (model / "hf" / "config.json").is_file() else "")
        raise ConfigError(f"--model: {str(model)!r} is not a model directory (no config.json)"
                          + hint)
    for path in args.data:
        if not Path(path).exists():
            raise ConfigError(f"--data: no such file or folder {path!r}")
    if args.chat_template is not None:
        from luffy_fast.model_loading import read_chat_template

        read_chat_template(args.chat_template, "--chat-template")
    if args.n < 1:
        raise ConfigError(f"--n: must be at least 1 (got {args.n})")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be at least 1 (got {args.max_new_tokens})")
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be a finite number >= 0 and --top-p in (0, 1] "
                          f"(got {args.temperature}, {args.top_p})")
    # an int64 for torch's generators; vLLM's workers also seed numpy, which takes < 2**32
    engine = engine_name(args.engine)
    bits = 32 if engine == "vllm" else 63
    if not 0 <= args.seed < 2**bits:
        raise ConfigError(f"--seed: must be in [0, 2**{bits}) with the {engine} engine "
                          f"(got {args.seed})")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1 (got {args.batch_size})")
    if args.save_every < 1:
        raise ConfigError(f"--save-every: must be at least 1 (got {args.save_every})")
    if (args.resume or args.overwrite) and args.output is None:
        raise ConfigError(f"--{'resume' if args.resume else 'overwrite'}: needs --output (the "
                          f"folder of the eval's files)")
    if args.output is not None:
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise ConfigError(f"--output: {args.output!r} is a file; it names the folder for "
                              f"results.json and generations.jsonl")
        ensure_writable_dir(args.output, "--output")
    if args.tensor_parallel_size < 1:
        raise ConfigError(f"--tensor-parallel-size: must be at least 1 "
                          f"(got {args.tensor_parallel_size})")
    if args.reward_workers is not None and args.reward_workers < 0:
        raise ConfigError(f"--reward-workers: must be >= 0 (got {args.reward_workers})")
    if not 0 < args.reward_timeout <= MAX_TIMEOUT:  # the pool's bound, before the model loads
        raise ConfigError(f"--reward-timeout: must be a positive number of seconds, at most "
                          f"{MAX_TIMEOUT:g} (got {args.reward_timeout})")


def check_window(model_dir: str, longest: int, max_new_tokens: int, engine: str) -> None:
    """The longest prompt plus --max-new-tokens against the model's window
    (max_position_embeddings). With hf, a warning: generation past it relies on the positions
    extrapolating, as the stock Qwen2.5-Math-7B (4096) would for LUFFY's 8192 new tokens; the
    official evaluation uses the 16k-window model. With vllm, an error before the engine starts:
    vLLM refuses such a max_model_len unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (or the config's
    model_max_length) allows it. A model with RoPE scaling (e.g. YaRN) is left alone: its window
    is longer than max_position_embeddings says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    window = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    scaled = isinstance(scaling, dict) and scaling.get("rope_type") not in ("default", None)
    if window is None or longest <= window or scaled:
        return
    problem = (f"--max-new-tokens: the longest prompt plus {max_new_tokens} new tokens is "
               f"{longest} tokens, more than the model's window ({window}, "
               f"max_position_embeddings)")
    allowed = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")
    model_max_length = getattr(config, "model_max_length", None)
    if engine == "vllm" and not allowed and not (model_max_length and longest <= model_max_length):
        raise ConfigError(f"{problem}, which vLLM refuses: lower --max-new-tokens, or set "
                          f"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to generate past it anyway")
    warn(problem)


def engine_name(requested: str) -> str:
    """vLLM when installed and on CUDA (or asked for), transformers `generate` otherwise."""
    if requested != "auto":
        return requested
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"


def build_engine(name: str, model_dir: str, tokenizer, args: argparse.Namespace,
                 max_model_len: int) -> RolloutEngine:
    """The generation engine over the model directory's weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "vllm":
        from luffy_fast.rollout.vllm import VLLMRolloutEngine
        from luffy_fast.rollout.vllm_config import VLLMConfig

        options = VLLMConfig(max_model_len=max_model_len, sleep_level=0,
                             tensor_parallel_size=args.tensor_parallel_size,
                             gpu_memory_utilization=0.9 if device.type == "cuda" else None)
        return VLLMRolloutEngine(model_dir, options, seed=args.seed, device=device)
    from transformers import AutoModelForCausalLM

    from luffy_fast.rollout.hf import HFGenerateEngine

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return HFGenerateEngine(model, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, max_batch_size=args.batch_size)


def run_eval(args: argparse.Namespace) -> int:
    from luffy_fast.data import load_tokenizer
    from luffy_fast.eval_data import load_eval_problems
    from luffy_fast.model_loading import pad_with_eos, read_chat_template

    check_arguments(args)
    tokenizer = pad_with_eos(load_tokenizer(args.model))
    if args.chat_template is not None:
        tokenizer.chat_template = read_chat_template(args.chat_template, "--chat-template")
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--model: the tokenizer of {args.model!r} has no chat template; pass "
                          f"--chat-template FILE (a Jinja template, e.g. configs/templates/)")
    problems = [problem for path in args.data for problem in load_eval_problems(
        path, tokenizer, question_key=args.question_key, answer_key=args.answer_key,
        data_source=args.source)]
    name = engine_name(args.engine)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    longest = max(len(p.prompt_ids) for p in problems) + args.max_new_tokens
    check_window(args.model, longest, args.max_new_tokens, name)
    settings = {"model": str(args.model), "data": list(args.data), "n": args.n,
                "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "engine": name, "seed": args.seed,
                # with sampling, the hf engine's draws depend on it (one stream per call)
                "batch_size": args.batch_size, "source": args.source,
                "chat_template": args.chat_template or "the model's",
                "question_key": args.question_key, "answer_key": args.answer_key,
                "save_every": args.save_every}
    # the folder held while the eval writes there: a second eval in it is refused
    with claim_run_dir(args.output, key="--output") if args.output else contextlib.nullcontext():
        return _generate_and_report(args, problems, tokenizer, name, params, longest, settings)


def _generate_and_report(args: argparse.Namespace, problems: list, tokenizer, name: str,
                         params: SamplingParams, longest: int, settings: dict) -> int:
    """Generation and scoring (what an interrupted eval in --output left read first, before the
    model loads), the table and the files."""
    from luffy_fast.reward_pool import RewardPool
    from luffy_fast.rewards import MathVerifyReward

    per_chunk = problems_per_chunk(args.save_every, args.n)  # with --output or not: same samples
    store, done = None, {}
    if args.output:  # checked, and what an interrupted eval left read, before the model loads
        store = EvalStore.open(args.output, settings, args.resume, args.overwrite)
        done = store.completed(problems, args.n, per_chunk)
        if done:
            print(f"eval: resuming with {len(done)} of {len(problems)} problems done "
                  f"({store.generations})", file=sys.stderr)
    start = time.perf_counter()
    pool = RewardPool(MathVerifyReward(), workers=args.reward_workers,
                      timeout=args.reward_timeout)  # its settings checked before the model loads
    engine = build_engine(name, args.model, tokenizer, args, longest)
    engine.show_progress = ProgressLog.bar_wanted(True)  # a terminal, as the trainer's bar
    finished = [len(done)]

    def save(records) -> None:
        store.append(records)
        finished[0] += len(records) // args.n
        print(f"eval: {finished[0]}/{len(problems)} problems in {store.generations} "
              f"({(time.perf_counter() - start) / 60:.1f} min)", file=sys.stderr, flush=True)

    try:
        with pool:
            records = generate_and_score(
                engine, problems, args.n, params,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
                lambda items: pool.score(items).rewards, per_chunk=per_chunk, done=done,
                save=save if store else None)
    finally:
        engine.close()
    summary = summarize(records, args.n)
    print(format_table(summary))
    if store:
        results = store.finish(summary, {**settings, "seconds": time.perf_counter() - start})
        print(f"results: {results}  generations: {store.generations}")
    return 0
