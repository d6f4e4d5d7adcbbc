"""The benchmarks' implementation names with opt-in switches (benchmarks/impls.py: "triton+half",
"triton+rows"): what each sets, what is refused, and the extra implementations a plan takes
(LUFFY_BENCH_EXTRA_IMPLS)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, impls  # noqa: E402


def test_switches_set_environment_variables_and_config_fields():
    v = impls.variant("triton_256mb+rows+half")
    assert v.base == "triton_256mb"
    assert v.env == {"LUFFY_FAST_ROW_FORWARD": "1"} and v.config == {"logits_dtype": "input"}
    assert impls.variant("naive") == impls.Variant("naive")
    lean = impls.variant("token_logprobs+lean+half")
    assert lean.env == {"LUFFY_FAST_LEAN": "1"} and lean.config == {"logits_dtype": "input"}


@pytest.mark.parametrize("switch", ["lean", "fused"])
def test_a_switch_preset_pairs_each_run_with_the_switch(switch):
    from benchmarks.profile_op import PRESETS

    runs = PRESETS[switch].split(",")
    for run in runs:
        impls.variant(run.split(":")[1])  # every name parses
    plain = [run for run in runs if f"+{switch}" not in run and run.split(":")[1].split("+")[0] in
             ("triton", "triton_256mb", "triton_lowmem", "token_logprobs")]
    assert len(plain) >= 6
    assert all(run.replace("+half", "") + f"+{switch}" + ("+half" if "+half" in run else "")
               in runs for run in plain)
    assert impls.variant(f"triton+{switch}").env == impls.SWITCHES[switch]["env"]


@pytest.mark.parametrize("name", ["naive+half", "torch+half", "gemm_floor+half", "triton+fast"])
def test_switches_a_backend_would_ignore_are_refused(name):
    with pytest.raises(ValueError, match=name.split("+")[0] if name != "triton+fast" else "fast"):
        impls.variant(name)


def test_the_loss_runs_with_the_switches_on_and_puts_the_environment_back(monkeypatch):
    seen = []

    def fake_loss(*args, config, backend, **kwargs):
        seen.append((backend, config.logits_dtype, config.memory_budget_mb,
                     os.environ.get("LUFFY_FAST_ROW_FORWARD")))
        return "loss"

    monkeypatch.setattr(impls, "fused_luffy_loss", lambda *a, **k: (fake_loss(*a, **k), {}))
    monkeypatch.delenv("LUFFY_FAST_ROW_FORWARD", raising=False)
    inputs = cases.make_inputs(cases.Case("dense", 16, 8, 32, n_seqs=4, group_size=2), "cpu")
    assert impls.loss_fn("triton_256mb+rows+half")(inputs) == "loss"
    assert impls.loss_fn("triton")(inputs) == "loss"
    assert seen == [("triton", "input", 256, "1"), ("triton", "float32", None, None)]
    assert "LUFFY_FAST_ROW_FORWARD" not in os.environ


def test_a_plan_takes_extra_implementations_from_the_environment(monkeypatch):
    monkeypatch.setenv(cases.EXTRA_IMPLS, "triton+half, token_logprobs+half")
    plan = cases.make_plan("cuda")
    assert plan.impls[-2:] == ["triton+half", "token_logprobs+half"]
    dense, rlvr = (c for c in plan.main_cases[:2])
    assert cases.runs_on("token_logprobs+half", dense) and not cases.runs_on("token_logprobs+half", rlvr)
    monkeypatch.setenv(cases.EXTRA_IMPLS, "triton")  # no switch: already in the plan
    with pytest.raises(ValueError, match=cases.EXTRA_IMPLS):
        cases.make_plan("cuda")
    monkeypatch.setenv(cases.EXTRA_IMPLS, "naive+half")
    with pytest.raises(ValueError, match="naive"):
        cases.make_plan("cuda")


def test_the_narrow_switch_gives_the_filter_round_3s_gpu_tiles(monkeypatch):
    import torch

    from luffy_fast.kernels import backward_filtered

    monkeypatch.setattr(backward_filtered, "INTERPRET", False)  # the GPU's tiles
    monkeypatch.delenv("LUFFY_FAST_FILTER_TILES", raising=False)
    wide = backward_filtered.filter_tiles(torch.bfloat16)
    for name, value in impls.variant("triton_filter+narrow").env.items():
        monkeypatch.setenv(name, value)
    narrow = backward_filtered.filter_tiles(torch.bfloat16)

    def shape(tiles):
        return tiles["hidden"]["SPAN"], tiles["hidden"]["BLOCK_OUT"], tiles["weight"]["BLOCK_OUT"]

    assert shape(wide) == (2, 256, 256) and shape(narrow) == (1, 128, 128)
    assert narrow["logits"] == wide["logits"]  # the same block map either way
