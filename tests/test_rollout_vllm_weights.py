"""Weight hand-off to rollout engines: names, plain modules, and ZeRO-3 gathering in buckets."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from luffy_fast.rollout.weights import engine_weight_name, gathered_named_parameters, size_capped

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
    ("module.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("_orig_mod.model.norm.weight", "model.norm.weight"),
    ("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.bias",
     "model.layers.1.self_attn.q_proj.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("module.module.model.norm.weight", "model.norm.weight"),  # a DeepSpeed engine around DDP
    ("_orig_mod.module.lm_head.weight", "lm_head.weight"),  # torch.compile of a DDP module
])
def test_engine_weight_name_strips_wrappers(name, expected):
    assert engine_weight_name(name) == expected


def test_plain_module_yields_every_parameter_once_without_copy():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    model[1].weight = model[0].weight  # tied, as in a causal LM with tied embeddings
    pairs = list(gathered_named_parameters(model))
    assert [name for name, _ in pairs] == ["0.weight", "1.bias"]
    for (_, tensor), param in zip(pairs, model.parameters()):
        assert tensor.data_ptr() == param.data_ptr() and not tensor.requires_grad


def test_a_wrapped_plain_module_yields_transformers_names():
    wrapper = nn.Module()
    wrapper.module = nn.Linear(2, 3)  # as DDP holds the model
    assert [name for name, _ in gathered_named_parameters(wrapper)] == ["weight", "bias"]


def sized(*numels: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"p{i}", torch.zeros(n)) for i, n in enumerate(numels)]  # float32: 4 bytes each


@pytest.mark.parametrize("entries, groups", [
    # 32, 8, 8, 16, 4 bytes in 16-byte buckets: the first alone (bigger than the cap), then
    # 8 + 8 = 16 (the cap itself fits), then 16, then 4
    (sized(8, 2, 2, 4, 1), [["p0"], ["p1", "p2"], ["p3"], ["p4"]]),
    (sized(1, 1, 1, 1, 1), [["p0", "p1", "p2", "p3"], ["p4"]]),  # 4 bytes each: 4 fit
])
def test_buckets_hold_at_most_the_cap_or_one_bigger_entry(entries, groups):
    assert [[name for name, _ in bucket] for bucket in size_capped(entries, cap=16)] == groups


def test_zero3_shards_count_at_their_full_size():
    shards = sized(0, 0, 0)  # a ZeRO-3 rank holds no full tensor; ds_numel is the full size
    for (_, shard), numel in zip(shards, (3, 1, 4)):
        shard.ds_numel = numel
    groups = [[name for name, _ in bucket] for bucket in size_capped(shards, cap=16)]
    assert groups == [["p0", "p1"], ["p2"]]  # 12 + 4 bytes, then 16


class FakeDeepSpeed:
    """deepspeed.zero.GatheredParameters for parameters carrying `full` (their gathered value):
    gathering fills them in, releasing overwrites and frees the gathered storage, as DeepSpeed
    reuses it. `events` records gathers, releases and what the consumer received when."""

    def __init__(self, events):
        self.zero = self
        self.events = events

    def GatheredParameters(self, params, modifier_rank):  # noqa: N802 (DeepSpeed's name)
        events = self.events

        class Gathered:
            def __enter__(self):
                events.append(("gather", [p.ds_name for p in params], modifier_rank))
                for p in params:
                    p.data = p.full.clone()

            def __exit__(self, *exc):
                events.append(("release",))
                for p in params:
                    p.data.fill_(float("nan"))
                    p.data = torch.zeros(0)

        return Gathered()


def test_zero3_parameters_are_gathered_a_bucket_at_a_time_read_only_and_copied(monkeypatch):
    torch.manual_seed(0)
    model = nn.Module()
    model.module = nn.ParameterDict({name: nn.Parameter(torch.randn(n)) for name, n in
                                     (("a", 4), ("b", 4), ("c", 8), ("d", 2))})
    full = {name: p.detach().clone() for name, p in model.module.items()}
    for name, param in model.module.items():
        if name != "d":  # d stays whole (not partitioned), as a ZeRO-3 model may keep some
            param.full, param.ds_id, param.ds_name = param.data, name, name
            param.ds_numel = param.numel()
            param.data = torch.zeros(0)
    events = []
    monkeypatch.setitem(sys.modules, "deepspeed", FakeDeepSpeed(events))
    # 32-byte buckets: a + b (16 + 16), then c (32), then d (8) alone
    for name, tensor in gathered_named_parameters(model, bucket_mb=32 / 2**20):
        events.append(("received", name))
        torch.testing.assert_close(tensor, full[name], rtol=0, atol=0)  # "module." stripped
    assert events == [("gather", ["a", "b"], None), ("release",), ("received", "a"),
                      ("received", "b"), ("gather", ["c"], None), ("release",), ("received", "c"),
                      ("received", "d")]


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError, match="bucket_mb"):
        list(gathered_named_parameters(nn.Linear(2, 2), bucket_mb=0))


ZERO3_SCRIPT = textwrap.dedent("""
    import os, socket
    import torch, deepspeed
    from torch import nn
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from luffy_fast.rollout.weights import gathered_named_parameters

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 50))

    reference = dict(build().named_parameters())
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        model = build()
    gathered_sizes = []
    original = deepspeed.zero.GatheredParameters

    class Recording(original):
        def __init__(self, params, *args, **kwargs):
            gathered_sizes.append(sum(p.ds_numel * p.element_size() for p in params))
            super().__init__(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = Recording
    cap_mb = 0.004  # 4194 bytes: the 3200-byte embedding and 2048-byte linear go apart
    pairs = list(gathered_named_parameters(model, bucket_mb=cap_mb))
    assert [n for n, _ in pairs] == list(reference), [n for n, _ in pairs]
    for name, tensor in pairs:
        assert torch.equal(tensor, reference[name]), name
    largest = max(p.numel() * p.element_size() for p in reference.values())
    assert len(gathered_sizes) > 1 and max(gathered_sizes) <= max(cap_mb * 2**20, largest)
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned again afterwards
    print("ZERO3-OK", gathered_sizes)
""")


@pytest.mark.slow
def test_zero3_parameters_gathered_in_capped_buckets():
    pytest.importorskip("deepspeed")
    run = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "ZERO3-OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
