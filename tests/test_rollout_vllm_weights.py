"""Weight hand-off to rollout engines: names, plain modules, and ZeRO-3 gathering in buckets."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from luffy_fast.rollout.weights import engine_weight_name, gathered_named_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
    ("module.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("_orig_mod.model.norm.weight", "model.norm.weight"),
    ("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.bias",
     "model.layers.1.self_attn.q_proj.bias"),
    ("lm_head.weight", "lm_head.weight"),
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
