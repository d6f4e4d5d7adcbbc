"""benchmarks/gpu_trainer_check.sh and benchmarks/trainer_update.py at toy sizes on the CPU
(BENCH_DRY_RUN=1): the stages the GPU run goes through, checked on the numbers they write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import trainer_update as tu  # noqa: E402


def test_generated_data_tokenizes_and_the_traces_earn_the_math_reward(tmp_path):
    """The generated JSONL goes through the trainer's own loader and reward: every trace is
    correct (reward 1), so LUFFY's groups always have an off-policy success."""
    from luffy_fast.data import load_jsonl_samples
    from luffy_fast.rewards import MathVerifyReward

    plan = tu.DRY
    tokenizer = tu.build_tokenizer(plan.vocab_size)
    assert len(tokenizer) == plan.vocab_size
    # every id a random policy can sample decodes to a word
    assert all(tokenizer.convert_ids_to_tokens(i) for i in range(plan.vocab_size))
    rows = tu.jsonl_rows(plan)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_jsonl_samples(path, tokenizer, plan.prompt_words + 8, plan.max_response_length)
    assert len(samples) == plan.num_rows
    reward = MathVerifyReward()
    for sample, row in zip(samples, rows):
        assert sample.ground_truth == row["reward_model"]["ground_truth"]
        (trace,) = sample.traces
        assert len(trace) == plan.trace_words + 3  # reasoning words, </think>, \boxed{d}, <eos>
        assert reward(tokenizer.decode(trace), sample) == 1.0
        wrong = tokenizer.decode(trace).replace("\\boxed{", "\\boxed{1")
        assert reward(wrong, sample) == 0.0


def test_synthetic_micro_batches_have_the_asked_shape():
    plan = tu.DRY
    micro = tu.synthetic_micro_batch(plan, rows=4, length=plan.row_length, seed=0,
                                     device=torch.device("cpu"))
    assert micro.num_tokens == 4 * plan.row_length
    assert micro.lengths == [plan.row_length] * 4
    response = plan.row_length + 1 - plan.prompt_length
    assert int(micro.loss_mask.sum()) == 4 * response
    assert int(micro.off_policy_mask.sum()) == 2 * plan.row_length  # one trace per group of two
    assert set(micro.advantages.tolist()) == {1.0, -1.0}
    single = tu.synthetic_micro_batch(plan, rows=1, length=200, seed=1, device=torch.device("cpu"))
    assert single.num_tokens == 200 and not bool(single.off_policy_mask.any())


def _write(work: Path, stage: str, rows: list[dict]) -> None:
    for row in rows:
        tu.emit(work, stage, row)


def _throughput(impl: str, tokens_per_second: dict[int, float]) -> list[dict]:
    return [{"kind": "throughput", "impl": impl, "tokens": t, "status": "ok",
             "tokens_per_second": v, "peak_mb": 1024.0} for t, v in tokens_per_second.items()]


def test_report_ratios_and_verdicts_from_known_numbers(tmp_path, capsys):
    """The table's ratios are the measured numbers' ratios, each beside its target."""
    plan = replace(tu.REAL, probe_lengths=(16384, 32768, 65536, 131072))
    k4, k16, k32 = plan.micro_batch_tokens
    _write(tmp_path, "update-fused", _throughput("fused", {k4: 9000.0, k16: 12000.0, k32: 11000.0})
           + [{"kind": "growth", "impl": "fused", "growth_mb": 0.5, "ok": True},
              {"kind": "longest", "impl": "fused", "longest": 131072, "limit_reached": False}])
    _write(tmp_path, "update-naive", _throughput("naive", {k4: 8000.0, k16: 10000.0})
           + [{"kind": "throughput", "impl": "naive", "tokens": k32, "status": "oom"},
              {"kind": "longest", "impl": "naive", "longest": 32768, "limit_reached": True}])
    # Liger cut short by its timeout: no "longest" row, the last passing probe counts
    _write(tmp_path, "update-liger", _throughput("liger", {k4: 2000.0, k16: 3000.0})
           + [{"kind": "probe", "impl": "liger", "length": 16384, "status": "ok"}])
    _write(tmp_path, "train", [{"ok": True, "steps": 3, "expected_steps": 3}])
    _write(tmp_path, "parity", [{"backend": "reference", "ok": True},
                                {"backend": "triton", "rel_l2_error": 4e-3, "ok": True},
                                {"backend": "torch", "rel_l2_error": 5e-2, "ok": False}])
    summary = tu.report(plan, tmp_path, tmp_path / "out")
    checks = {c["name"]: c for c in summary["checks"]}
    longest = checks["longest sequence, fused / naive"]
    assert longest["value"] == 4.0 and longest["ok"] and "lower bound" in longest["note"]
    vs_naive = checks["tokens/s at 16k, fused / naive"]
    assert vs_naive["value"] == pytest.approx(1.2) and vs_naive["ok"]
    vs_liger = checks["tokens/s at 16k, fused / liger"]
    assert vs_liger["value"] == pytest.approx(4.0) and vs_liger["ok"]
    assert not any("fused_half" in name for name in checks)  # not run: no rows, no verdicts
    assert checks["allocated growth over steps, fused (MiB)"]["ok"]
    assert checks["gradient, triton vs reference (rel. L2)"]["ok"]
    assert not checks["gradient, torch vs reference (rel. L2)"]["ok"]
    assert "gradient, triton+liger vs triton (rel. L2)" not in checks  # not run: no row
    assert summary["impls"]["liger"]["longest"]["longest"] == 16384
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("gradient, torch vs reference") and table[-1].endswith("MISS")
    assert any(line.startswith("naive") and "oom" in line and "32k" in line for line in table)
    saved = json.loads((tmp_path / "out" / "trainer_check.json").read_text())
    assert saved["checks"] == json.loads(json.dumps(summary["checks"]))

    # naive out of memory at the first probe: fused must reach twice that length to pass
    _write(tmp_path, "update-naive", [{"kind": "longest", "impl": "naive", "longest": 0,
                                       "limit_reached": True}])
    assert tu.summarize(plan, tmp_path)["checks"][0]["ok"]
    (tmp_path / "results" / "update-fused.jsonl").write_text(json.dumps(
        {"kind": "longest", "impl": "fused", "longest": 16384, "limit_reached": True}) + "\n")
    assert not tu.summarize(plan, tmp_path)["checks"][0]["ok"]

    # the 16-bit-logits head, where it ran, gets ratios of its own beside the default's
    _write(tmp_path, "update-fused_half", _throughput("fused_half", {k16: 13000.0}))
    checks = {c["name"]: c for c in tu.summarize(plan, tmp_path)["checks"]}
    assert checks["tokens/s at 16k, fused_half / naive"]["value"] == pytest.approx(1.3)
    assert checks["tokens/s at 16k, fused_half / liger"]["value"] == pytest.approx(13 / 3)
    assert not any("fused_liger" in name for name in checks)  # not run: no verdicts
    _write(tmp_path, "update-fused_liger", _throughput("fused_liger", {k16: 11000.0}))
    checks = {c["name"]: c for c in tu.summarize(plan, tmp_path)["checks"]}
    assert checks["tokens/s at 16k, fused_liger / naive"]["value"] == pytest.approx(1.1)

    # naive's probes cut short by the timeout before any ran out of memory: its longest is a
    # lower bound, so the ratio may be too high, and no pass is claimed
    (tmp_path / "results" / "update-naive.jsonl").write_text(json.dumps(
        {"kind": "probe", "impl": "naive", "length": 16384, "status": "ok"}) + "\n")
    (tmp_path / "results" / "update-fused.jsonl").write_text(json.dumps(
        {"kind": "longest", "impl": "fused", "longest": 131072, "limit_reached": True}) + "\n")
    longest = tu.summarize(plan, tmp_path)["checks"][0]
    assert longest["value"] == 8.0 and not longest["ok"] and "upper bound" in longest["note"]

    # the triton backend with Liger's kernels in the model's layers, where it ran
    _write(tmp_path, "parity", [{"backend": "triton+liger", "rel_l2_error": 2e-2, "ok": True}])
    checks = {c["name"]: c for c in tu.summarize(plan, tmp_path)["checks"]}
    liger = checks["gradient, triton+liger vs triton (rel. L2)"]
    assert liger["value"] == 2e-2 and liger["ok"]


@pytest.mark.slow
def test_dry_run_of_the_whole_gpu_trainer_check(tmp_path):
    """The shell script end to end at toy sizes (about 100 s on two cores): every stage runs and
    writes numbers that hold up."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = subprocess_env(BENCH_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out),
               TRAINER_CHECK_WORK=str(work), GPU_CHECK_BUDGET_S="900")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_trainer_check.sh")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    stages = next(line for line in log.splitlines() if "] stages: " in line)
    for stage in ("prepare", "train", "check-train", "grad-parity", "update-fused",
                  "update-fused_half", "update-naive", "update-liger", "fit-fused", "fit-naive"):
        assert f"{stage}: ok" in stages, stages
    assert sorted(p.name for p in out.iterdir()) == [
        "train_metrics.jsonl", "trainer_check.json", "trainer_check.log", "trainer_check.txt"]
    summary = json.loads((out / "trainer_check.json").read_text())
    plan = tu.DRY

    # a. the train run: every step finite, and math-verify scored the generated traces 1
    train = summary["train"]
    assert train["ok"] and train["steps"] == plan.train_steps and train["checkpoint"]
    assert all(math.isfinite(v) and v > 0 for v in train["grad_norms"])
    assert all(step["reward_off_policy"] == 1.0 for step in train["per_step"])
    # the fused backends' gradients against the reference backend's, fp32
    parity = summary["parity"]
    assert parity["reference"]["finite"] and parity["reference"]["grad_norm"] > 0
    for backend in ("triton", "torch"):
        assert parity[backend]["rel_l2_error"] <= 1e-5, parity[backend]
        assert parity[backend]["loss_rel_error"] <= 1e-6, parity[backend]

    # b. every implementation at every size; tokens/s is tokens over the median step time
    assert "update-fused_liger: skipped" in stages  # on request, and CUDA only
    for impl in tu.IMPLS:
        info = summary["impls"][impl]
        if impl == "fused_liger":
            assert not info["ran"]
            continue
        assert info["setup"]["impl"] == impl
        for tokens in plan.micro_batch_tokens:
            row = info["throughput"][str(tokens)]
            assert row["status"] == "ok" and row["loss_finite"], row
            assert row["rows"] * row["row_length"] == tokens
            assert row["tokens_per_second"] == pytest.approx(tokens / row["median_seconds"])
            assert row["peak_mb"] > 0
        assert info["growth"]["growth_mb"] <= plan.growth_tolerance_mb
        assert len(info["growth"]["allocated_after_step_mb"]) == (
            plan.timed_steps * len(plan.micro_batch_tokens))
        if impl not in tu.PROBED:
            assert not info["probes"] and info["longest"] is None
            continue
        assert [p["length"] for p in info["probes"]] == list(plan.probe_lengths)
        assert info["longest"]["longest"] == plan.probe_lengths[-1]  # no OOM on the CPU
    checks = {c["name"]: c for c in summary["checks"]}
    fused = summary["impls"]["fused"]["throughput"][str(plan.target_tokens)]
    naive = summary["impls"]["naive"]["throughput"][str(plan.target_tokens)]
    assert checks["tokens/s at 256, fused / naive"]["value"] == pytest.approx(
        fused["tokens_per_second"] / naive["tokens_per_second"])
    half = summary["impls"]["fused_half"]
    assert "logits_dtype input" in half["setup"]["head"]
    assert checks["tokens/s at 256, fused_half / naive"]["value"] == pytest.approx(
        half["throughput"][str(plan.target_tokens)]["tokens_per_second"]
        / naive["tokens_per_second"])
    # the fit stages: no cap on the CPU, so no layer checkpointed; both heads timed both ways
    for impl in ("fused", "naive"):
        fit = summary["fit"][impl]
        assert fit["fit"]["fewest_checkpointed"] == 0 and fit["fit"]["limit_mb"] is None
        assert fit["all"]["checkpointed"] == plan.num_hidden_layers
        assert fit["fitted"]["checkpointed"] == 0 and fit["fitted"]["loss_finite"]
    assert checks["tokens/s at 256 uncapped, fused / naive"]["value"] == pytest.approx(
        summary["fit"]["fused"]["fitted"]["tokens_per_second"]
        / summary["fit"]["naive"]["fitted"]["tokens_per_second"])
    # c. the table is printed last
    table = (out / "trainer_check.txt").read_text().strip().splitlines()
    assert log.strip().splitlines()[-1] == table[-1]


def run_naive_update(work, impl: str = "naive", **fault) -> None:
    """An update stage (naive by default) at toy size in its own process, with a simulated fault
    (BENCH_FAKE_OOM_AT or BENCH_FAKE_ERROR_ONCE_AT)."""
    env = subprocess_env(BENCH_DRY_RUN="1", **fault,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trainer_update", "update", "--impl",
                           impl, "--work", str(work)], env=env, cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def assert_old_engines_were_freed(rows: list[dict]) -> None:
    """Every engine built after a failure was built with no earlier one alive: two engines at
    once hold twice the optimizer state, and the measurements after it would be off."""
    renewals = [r for r in rows if r["kind"] in ("renew", "rebuild")]
    assert renewals and all(r["live_engines_at_build"] == 0 for r in renewals), renewals


def test_out_of_memory_ends_the_sizes_and_the_probes(tmp_path):
    """A step that runs out of memory (simulated from 256 tokens on) skips the larger sizes,
    the probes run on a rebuilt engine, and the longest sequence is the last probe that fit."""
    run_naive_update(tmp_path, BENCH_FAKE_OOM_AT="256")
    rows = tu.read_rows(tmp_path, "update-naive")
    status = {r["tokens"]: r["status"] for r in rows if r["kind"] == "throughput"}
    assert status == {64: "ok", 256: "oom", 512: "skipped"}
    assert [r["kind"] for r in rows].count("rebuild") == 1
    assert_old_engines_were_freed(rows)
    probes = [(r["length"], r["status"]) for r in rows if r["kind"] == "probe"]
    assert probes == [(128, "ok"), (256, "oom")]
    (longest,) = [r for r in rows if r["kind"] == "longest"]
    assert longest["longest"] == 128 and longest["limit_reached"]
    growth = next(r for r in rows if r["kind"] == "growth")
    assert len(growth["allocated_after_step_mb"]) == tu.DRY.timed_steps  # the 64-token size only


def test_a_probe_error_other_than_memory_is_retried_and_is_no_limit(tmp_path):
    """A probe that fails for another reason (Liger's compiled loss at a new shape) is retried
    once on a fresh engine; the probes go on, and only running out of memory is a limit."""
    run_naive_update(tmp_path, BENCH_FAKE_ERROR_ONCE_AT="128")  # a probe length, not a size
    rows = tu.read_rows(tmp_path, "update-naive")
    probes = [(r["length"], r["status"], r.get("attempt", 0)) for r in rows if r["kind"] == "probe"]
    assert probes == [(128, "error", 0), (128, "ok", 1), (256, "ok", 0), (512, "ok", 0)]
    assert [r["kind"] for r in rows].count("renew") == 1
    assert_old_engines_were_freed(rows)
    (longest,) = [r for r in rows if r["kind"] == "longest"]
    assert longest["longest"] == 512 and not longest["limit_reached"]
    growth = next(r for r in rows if r["kind"] == "growth")  # decided over steps of one size
    assert growth["ok"] == (growth["same_size_growth_mb"] <= tu.DRY.growth_tolerance_mb)


def test_the_16_bit_logits_head_measures_sizes_only(tmp_path):
    """fused_half (logits_dtype input) shares fused's budget, so it is timed, not probed: out of
    memory ends its sizes with no engine rebuilt for probes that would not run."""
    run_naive_update(tmp_path, impl="fused_half", BENCH_FAKE_OOM_AT="256")
    rows = tu.read_rows(tmp_path, "update-fused_half")
    status = {r["tokens"]: r["status"] for r in rows if r["kind"] == "throughput"}
    assert status == {64: "ok", 256: "oom", 512: "skipped"}
    kinds = [r["kind"] for r in rows]
    assert "rebuild" not in kinds and "probe" not in kinds and "longest" not in kinds
    assert "logits_dtype input" in rows[0]["head"]


def test_an_error_other_than_memory_is_retried_once_on_a_fresh_engine(tmp_path):
    """A step that fails for another reason (as Liger's torch.compile did when the row count
    changed) is retried on a fresh engine, and its size is then measured; the growth check covers
    the fresh engine only."""
    run_naive_update(tmp_path, BENCH_FAKE_ERROR_ONCE_AT="256")
    rows = [r for r in tu.read_rows(tmp_path, "update-naive") if r["kind"] == "throughput"]
    assert [(r["tokens"], r["status"], r.get("attempt", 0)) for r in rows] == [
        (64, "ok", 0), (256, "error", 0), (256, "ok", 1), (512, "ok", 0)]
    assert "simulated" in rows[1]["error"]
    assert_old_engines_were_freed(tu.read_rows(tmp_path, "update-naive"))
    summary = tu.summarize(tu.DRY, tmp_path)
    assert summary["impls"]["naive"]["throughput"]["256"]["status"] == "ok"
    growth = next(r for r in tu.read_rows(tmp_path, "update-naive") if r["kind"] == "growth")
    assert len(growth["allocated_after_step_mb"]) == 2 * tu.DRY.timed_steps  # 256 and 512 only


def test_stage_limits_share_the_time_left_in_proportion_to_the_caps():
    """benchmarks/stages.sh: a stage gets its cap while the budget holds the caps still to run,
    else its cap's share of the time left; unselected stages take no share."""
    script = (f"source {ROOT / 'benchmarks' / 'stages.sh'}; "
              'STAGE_ORDER="a b c"; STAGE_CAPS="a:90 b:180 c:30"; START=$(date +%s); '
              "BUDGET=150; stage_limit a; stage_limit b; stage_limit c; "
              'STAGES="b,c"; stage_limit b; BUDGET=1000; STAGES=; stage_limit a')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [int(v) for v in out.stdout.split()]
    # 90*150/300, 180*150/210, the whole cap (30 <= 150), 180*150/210, the whole cap; a second
    # passing between START and a call takes at most one second's share off.
    want = [45, 128, 30, 128, 90]
    assert all(w - 1 <= g <= w for g, w in zip(got, want)) and len(got) == len(want), got
