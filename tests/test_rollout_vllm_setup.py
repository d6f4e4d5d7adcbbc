"""The vLLM engine's bookkeeping without starting vLLM: where tensor-parallel ranks run, request
seeds per data-parallel rank, sleep levels and their order of calls (against a recording
stand-in for `vllm.LLM`), random state kept across start-up, one sleep-mode engine per process."""

import random
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import luffy_fast.rollout.vllm as vllm_engine
from luffy_fast.rollout.vllm import VLLMRolloutEngine, request_seed
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.vllm_setup import (
    EngineLayout,
    VLLMStartupError,
    engine_kwargs,
    engine_layout,
    preserved_random_state,
)

PARAMETERS = {"model.embed_tokens.weight", "model.norm.weight"}
EOS = 1


class RecordingLLM:
    """Records what the engine asks of vLLM; two workers answer every RPC."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))

    @property
    def llm_engine(self):  # llm.llm_engine.engine_core.shutdown()
        core = type("Core", (), {"shutdown": lambda _: self.calls.append(("shutdown",))})()
        return type("Engine", (), {"engine_core": core})()

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, method, args=()):
        if method == "luffy_parameter_names":
            self.calls.append(("rpc", method))
            return [set(PARAMETERS), set(PARAMETERS)]
        names = [name for name, _ in args[0]]
        self.calls.append(("rpc", method, tuple(names)))
        return [names] * 2  # lists, as a msgpack reply would be

    def generate(self, requests, settings, use_tqdm=False):
        """Sample k of a prompt ending in token t: [t + k + 1, EOS] ("stop") for even k, else
        [t + k + 1] ("length"), each token at log-prob -(k + 1) / 4. Scoring (one settings object,
        prompt_logprobs): token t of the scored ids at log-prob -t / 10, the first one None."""
        self.calls.append(("generate", requests, settings))
        if not isinstance(settings, list):
            return [SimpleNamespace(prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-t / 10)}
                                                              for t in r["prompt_token_ids"][1:]])
                    for r in requests]
        outputs = []
        for request, setting in zip(requests, settings):
            samples = []
            for k in range(setting.n):
                tokens = [request["prompt_token_ids"][-1] + k + 1] + ([EOS] if k % 2 == 0 else [])
                samples.append(SimpleNamespace(
                    token_ids=tokens, finish_reason="length" if k % 2 else "stop",
                    logprobs=[{t: SimpleNamespace(logprob=-(k + 1) / 4)} for t in tokens]))
            outputs.append(SimpleNamespace(outputs=samples))
        return outputs


@pytest.fixture
def make_engine(monkeypatch, tmp_path):
    """(engine on a pretend CUDA device, calls): vLLM replaced by RecordingLLM."""
    (tmp_path / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(vllm_engine, "prepare_environment", lambda *args: None)
    monkeypatch.setattr(vllm_engine, "check_one_sleep_mode_engine", lambda: None)
    monkeypatch.setattr(vllm_engine, "start_llm", lambda *args: RecordingLLM(calls))
    monkeypatch.setattr(vllm_engine.gc, "collect", lambda: calls.append(("gc",)))

    def make(**options):
        engine = VLLMRolloutEngine(tmp_path, VLLMConfig(**options), device=torch.device("cuda"))
        calls.clear()
        return engine, calls

    yield make


def weights(names=PARAMETERS):
    return [(name, torch.zeros(2)) for name in sorted(names)]


def test_sleep_level_2_is_the_cuda_default_and_1_stays_an_option(make_engine):
    assert make_engine()[0].sleep_level == 2
    assert make_engine(sleep_level=1)[0].sleep_level == 1
    assert make_engine(sleep_level=0)[0].sleep_level == 0


def test_every_step_sleeps_even_without_generation(make_engine):
    """The trainer's step with n_on = 0: sleep, sync, wake, and never a generate."""
    engine, calls = make_engine()
    for _ in range(3):
        engine.sleep()
        engine.sync_weights(weights())
        engine.wake()
    sleeps = [call for call in calls if call[0] == "sleep"]
    assert sleeps == [("sleep", 2)] * 3
    wakes = [call for call in calls if call[0] == "wake_up"]
    assert wakes == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))] * 3


def test_weights_sleep_again_when_only_the_kv_cache_is_asleep(make_engine):
    engine, calls = make_engine()
    engine.sleep()
    engine.sync_weights(weights())  # weights awake, KV cache still asleep: no wake() here
    engine.sleep()
    assert [call for call in calls if call[0] == "sleep"] == [("sleep", 2)] * 2
    engine.sleep()  # already asleep: nothing to do
    assert len([call for call in calls if call[0] == "sleep"]) == 2


def test_cache_is_emptied_before_every_wake(make_engine):
    engine, calls = make_engine()
    engine.sleep()
    engine.sync_weights(weights())
    engine.wake()
    for index, call in enumerate(calls):
        if call[0] == "wake_up":
            assert calls[index - 1] == ("gc",), calls


def test_level_2_needs_every_parameter_and_level_1_does_not(make_engine):
    engine, _ = make_engine()
    engine.sleep()
    params = vllm_engine.SamplingParams(max_new_tokens=2)
    with pytest.raises(RuntimeError, match="slept at level 2"):
        engine.generate([[1, 2]], n=1, params=params)
    assert engine.generate([], n=1, params=params) == []  # nothing to generate: no error
    with pytest.raises(RuntimeError, match="1 engine parameters unloaded"):
        engine.sync_weights(weights({"model.norm.weight"}))
    engine.sync_weights(weights())  # results arrive as lists: merged all the same

    engine, calls = make_engine(sleep_level=1)
    engine.sleep()
    engine.sync_weights(weights({"model.norm.weight"}))  # the rest was offloaded, not lost
    assert ("sleep", 1) in calls


def test_an_engine_closed_asleep_is_woken_before_its_shutdown(make_engine, monkeypatch):
    """vLLM's CUDA allocator releases its pools at shutdown as if mapped; memory that sleep()
    unmapped is then released twice, and the driver's error fails the next sleep-mode engine
    (vllm#36651): close() remaps it first."""
    monkeypatch.setattr(vllm_engine, "destroy_vllm_process_groups", lambda keep_default: None)
    engine, calls = make_engine()
    engine.sleep()
    engine.close()
    assert calls[-2:] == [("wake_up", None), ("shutdown",)]
    engine, calls = make_engine()  # awake: shut down as it is
    engine.close()
    assert calls == [("shutdown",)]
    engine.close()  # twice: nothing more
    assert calls == [("shutdown",)]


def test_an_engine_of_one_process_refuses_a_device_it_would_not_use(make_engine, tmp_path):
    make_engine()  # "cuda": the current device, 0
    with pytest.raises(VLLMStartupError, match="cuda:1 asked for.*CUDA_VISIBLE_DEVICES"):
        VLLMRolloutEngine(tmp_path, VLLMConfig(), device=torch.device("cuda:1"))


def test_the_ranks_of_one_engine_need_a_seed(make_engine, monkeypatch):
    """Under external_launcher with tensor_parallel_size > 1 every rank samples; unseeded, each
    would draw from its own RNG state and the ranks' tokens (and collectives) would part."""
    engine, calls = make_engine()
    engine.layout = EngineLayout(world=4, rank=1, tensor_parallel=2)
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        engine.generate([[1, 2]], n=1, params=vllm_engine.SamplingParams(max_new_tokens=2))
    assert calls == []  # refused before any collective
    greedy = vllm_engine.SamplingParams(max_new_tokens=2, temperature=0.0)  # the same everywhere
    monkeypatch.setattr(vllm_engine, "gather_engine_prompts", lambda layout, prompts: ([], None))
    assert engine.generate([[1, 2]], n=1, params=greedy) == []  # let through


def test_start_up_errors_point_the_memory_setting_the_right_way():
    from luffy_fast.rollout.vllm_setup import _explain

    # vLLM's start-up check, raised when the trainer already holds part of the GPU
    short = ValueError("Free memory on device cuda:0 (30.1/139.8 GiB) on startup is less than "
                       "desired GPU memory utilization (0.9, 125.8 GiB). Decrease GPU memory "
                       "utilization or reduce GPU memory used by other processes.")
    assert _explain(short, "m").endswith("(the trainer's tensors count): lower it")
    kv = ValueError("No available memory for the cache blocks.")
    assert _explain(kv, "m").endswith("raise rollout.vllm.gpu_memory_utilization or lower "
                                      "rollout.vllm.max_model_len")


def test_request_seeds_differ_across_data_parallel_ranks_only():
    seeds = {rank: [request_seed(7, i, rank) for i in range(64)] for rank in range(4)}
    streams = [set(range(s, s + 16)) for rank in seeds for s in seeds[rank]]
    assert sum(len(s) for s in streams) == len(set().union(*streams))  # no sample shared
    assert request_seed(7, 3, 2) == request_seed(7, 3, 2)
    assert request_seed(7, 3) == request_seed(7, 3, 0)


@pytest.mark.parametrize("world, rank, tp, backend, dp_rank, group", [
    (1, 0, 1, None, 0, [0]),
    (1, 0, 2, "mp", 0, [0, 1]),
    (4, 3, 1, "external_launcher", 3, [3]),
    (4, 3, 2, "external_launcher", 1, [2, 3]),
    (4, 1, 4, "external_launcher", 0, [0, 1, 2, 3]),
])
def test_layout_of_tensor_parallel_ranks(world, rank, tp, backend, dp_rank, group, tmp_path):
    layout = EngineLayout(world, rank, tp)
    assert (layout.backend, layout.data_parallel_rank, layout.tp_group_ranks) == \
        (backend, dp_rank, group)
    assert layout.worker_processes == (backend == "mp")
    kwargs = engine_kwargs(VLLMConfig(tensor_parallel_size=tp), tmp_path, 10, False, 2, layout)
    assert kwargs["seed"] == 10 + dp_rank
    assert kwargs.get("distributed_executor_backend") == backend
    assert kwargs["worker_extension_cls"] == "luffy_fast.rollout.vllm_worker.LuffyWorkerExtension"
    assert kwargs["enable_sleep_mode"]


def test_tensor_parallel_size_must_divide_the_training_ranks(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    with pytest.raises(VLLMStartupError, match="tensor_parallel_size: 3 does not divide the 4"):
        engine_layout(VLLMConfig(tensor_parallel_size=3))
    assert engine_layout(VLLMConfig(tensor_parallel_size=2)).data_parallel_rank == 0


def test_random_state_is_kept_across_start_up():
    torch.manual_seed(5)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    with preserved_random_state(torch.device("cpu")):
        torch.manual_seed(0)  # what vLLM's workers do in this process
        random.seed(0)
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_second_sleep_mode_engine_is_a_clear_error(monkeypatch):
    cumem = pytest.importorskip("vllm.device_allocator.cumem")
    from luffy_fast.rollout.vllm_setup import check_one_sleep_mode_engine

    class Allocator:
        def __init__(self, usage):
            self.usage = usage

        def get_current_usage(self):
            return self.usage

    monkeypatch.setattr(cumem.CuMemAllocator, "instance", Allocator(3 * 2**20))
    with pytest.raises(VLLMStartupError, match="one sleep-mode engine per process.*3 MiB"):
        check_one_sleep_mode_engine()
    monkeypatch.setattr(cumem.CuMemAllocator, "instance", None)
    check_one_sleep_mode_engine()
    # the allocator of an engine closed before: it stays, empty, and a new engine may start
    monkeypatch.setattr(cumem.CuMemAllocator, "instance", Allocator(0))
    check_one_sleep_mode_engine()


def test_worker_extension_loads_and_names_parameters():
    pytest.importorskip("vllm")
    from luffy_fast.rollout.vllm_worker import LuffyWorkerExtension

    class Model(torch.nn.Linear):
        def load_weights(self, weights):
            return [name for name, _ in weights]

    model = Model(2, 2)
    model.register_buffer("scale", torch.ones(2))  # a buffer: never sent, never waited for
    worker = LuffyWorkerExtension()
    worker.model_runner = type("Runner", (), {"model": model})()
    assert worker.luffy_load_weights([("weight", torch.zeros(2, 2)),
                                      ("bias", torch.zeros(2))]) == {"weight", "bias"}
    assert worker.luffy_parameter_names() == {"weight", "bias"}


def test_the_cpu_patch_keeps_linear_weights_and_leaves_other_layers_to_vllm(monkeypatch):
    """vLLM's CPU dispatch repacks a linear weight and drops it; the patch computes with the
    layer's own weight instead (a reload in place then lands). 3-D weights stay with vLLM."""
    layer_utils = pytest.importorskip("vllm.model_executor.layers.utils")
    from vllm.platforms import current_platform

    import luffy_fast.rollout.vllm_worker as worker_module

    # importing the worker module applied the patch, on a CPU platform only
    patched = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "keeps_weights_unpacked", False)
    assert patched == current_platform.is_cpu()
    handled = []
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm",
                        lambda layer, remove_weight: handled.append(tuple(layer.weight.shape)))
    worker_module.keep_cpu_linear_weights_unpacked()
    dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    linear = torch.nn.Linear(3, 2)
    dispatch(linear, remove_weight=True)
    assert linear.cpu_linear is torch.nn.functional.linear and handled == []
    assert isinstance(linear.weight, torch.nn.Parameter)  # kept, not removed
    experts = torch.nn.Module()
    experts.weight = torch.nn.Parameter(torch.zeros(4, 3, 2))  # MoE experts: vLLM's own path
    dispatch(experts, remove_weight=True)
    assert handled == [(4, 3, 2)] and not hasattr(experts, "cpu_linear")


def test_the_automatic_dtype_follows_the_trainers_precision():
    """On a GPU `dtype: auto` is the policy's training precision (fp32 training sampled in
    bf16 was not the policy trained); on the CPU it stays fp32; a dtype set by hand is kept."""
    from helpers import tiny_config
    from luffy_fast.rollout.factory import vllm_options

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    cases = [((), gpu, "bfloat16"), (("model.precision=fp32",), gpu, "float32"),
             (("model.precision=bf16",), gpu, "bfloat16"), ((), cpu, "auto"),
             (("model.precision=fp32", "rollout.vllm.dtype=bfloat16"), gpu, "bfloat16")]
    for overrides, device, dtype in cases:
        options = vllm_options(tiny_config("/tmp/unused", *overrides), device)
        assert options.dtype == dtype, (overrides, device)
        assert options.max_model_len == 8 + 24  # data.max_prompt_length + max_response_length
    kwargs = engine_kwargs(vllm_options(tiny_config("/tmp/unused"), cpu), Path("/m"), 1, True, 0,
                           EngineLayout(1, 0, 1))
    assert kwargs["dtype"] == "float32"


def test_generate_asks_for_n_samples_with_the_data_parallel_ranks_seeds(make_engine):
    engine, calls = make_engine()
    engine.layout = EngineLayout(world=4, rank=3, tensor_parallel=1)  # data-parallel rank 3
    params = vllm_engine.SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11)
    groups = engine.generate([[2, 3], [4]], n=2, params=params)
    (_, requests, settings), = calls
    assert requests == [{"prompt_token_ids": [2, 3]}, {"prompt_token_ids": [4]}]
    assert [(s.n, s.temperature, s.top_p, s.max_tokens, s.logprobs, s.detokenize)
            for s in settings] == [(2, 0.7, 0.9, 5, 0, False)] * 2
    # the rank is folded into each prompt's seed: rank 0's i-th prompt draws another stream
    assert [s.seed for s in settings] == [request_seed(11, 0, 3), request_seed(11, 1, 3)]
    assert request_seed(11, 0, 3) != request_seed(11, 0, 0)
    # RecordingLLM's samples: [t + k + 1, EOS] at -(k + 1) / 4 for even k, [t + k + 1] cut
    assert [[(c.token_ids, c.logprobs, c.finished) for c in group] for group in groups] == [
        [([4, EOS], [-0.25, -0.25], True), ([5], [-0.5], False)],
        [([5, EOS], [-0.25, -0.25], True), ([6], [-0.5], False)]]
    metrics = engine.metrics()
    assert metrics["generated_tokens"] == 6.0
    assert metrics["generate_tokens_per_second"] == pytest.approx(6 / metrics["generate_seconds"])


def test_a_rank_of_a_shared_engine_gets_only_its_own_prompts_back(make_engine, monkeypatch):
    """Rank 1 of an engine over two ranks: rank 0's prompt [9] comes first in the gathered
    requests; rank 1 keeps the rest (generation and scoring alike)."""
    engine, calls = make_engine()
    engine.layout = EngineLayout(world=2, rank=1, tensor_parallel=2)
    gathered = []

    def gather(layout, items):
        gathered.append(list(items))
        theirs = ([9], [2]) if isinstance(items[0], tuple) else [9]
        return [theirs] + list(items), slice(1, 1 + len(items))

    monkeypatch.setattr(vllm_engine, "gather_engine_prompts", gather)
    params = vllm_engine.SamplingParams(max_new_tokens=2, seed=0)
    groups = engine.generate([[2, 3], [4]], n=1, params=params)
    assert [[c.token_ids for c in group] for group in groups] == [[[4, EOS]], [[5, EOS]]]
    assert [r["prompt_token_ids"] for r in calls[-1][1]] == [[9], [2, 3], [4]]
    # the engine's log-prob of each continuation token t is -t / 10 (RecordingLLM)
    scores = engine.score([[2, 3], [4]], [[5, 6], [7]])
    assert scores == [[-0.5, -0.6], [-0.7]]
    assert [r["prompt_token_ids"] for r in calls[-1][1]] == [[9, 2], [2, 3, 5, 6], [4, 7]]


def test_data_parallel_engines_sample_without_a_seed(make_engine):
    """One training rank per engine (tensor_parallel_size 1): no other rank has to draw the same
    tokens, so an unseeded request is let through (the engine's own seed differs per rank)."""
    engine, calls = make_engine()
    engine.layout = EngineLayout(world=2, rank=1, tensor_parallel=1)
    groups = engine.generate([[2]], n=1, params=vllm_engine.SamplingParams(max_new_tokens=2))
    assert [c.token_ids for c in groups[0]] == [[3, EOS]]
    assert [s.seed for s in calls[-1][2]] == [None]


def test_weights_go_in_buckets_under_transformers_names_then_the_prefix_cache_resets(make_engine):
    # 16-byte buckets of 8-byte tensors: two fill a bucket (the cap itself fits)
    engine, calls = make_engine(sync_bucket_mb=16 / 2**20)
    engine.sync_weights((f"module.layers.{i}.weight", torch.zeros(2)) for i in range(5))
    assert calls == [("rpc", "luffy_load_weights", ("layers.0.weight", "layers.1.weight")),
                     ("rpc", "luffy_load_weights", ("layers.2.weight", "layers.3.weight")),
                     ("rpc", "luffy_load_weights", ("layers.4.weight",)),
                     ("reset_prefix_cache",)]  # awake: nothing to wake, no gc
    assert set(engine.metrics()) == {"sync_seconds", "wake_weights_seconds"}
    assert engine.metrics()["wake_weights_seconds"] == 0.0
    engine, calls = make_engine(sleep_level=0)  # no sleep mode: no wake timings
    engine.sync_weights(weights())
    assert set(engine.metrics()) == {"sync_seconds"}


def test_a_weight_bucket_never_holds_more_than_sync_bucket_mb(make_engine):
    """rollout.vllm.sync_bucket_mb: weights are handed to the engine in buckets of at most this
    size (one bigger tensor alone). 8 + 4 bytes leave room for 4 more in 16, not for 8: that one
    starts the next bucket (a bucket of 20 bytes was sent)."""
    engine, calls = make_engine(sync_bucket_mb=16 / 2**20)
    engine.sync_weights([("a", torch.zeros(2)), ("b", torch.zeros(1)), ("c", torch.zeros(2)),
                         ("d", torch.zeros(8)), ("e", torch.zeros(1))])
    assert [call[2] for call in calls if call[0] == "rpc"] == [("a", "b"), ("c",), ("d",), ("e",)]


def test_a_full_sync_after_a_level_2_sleep_makes_the_engine_generate_again(make_engine):
    engine, calls = make_engine()
    engine.sleep()
    engine.sync_weights(weights())
    groups = engine.generate([[2]], n=1, params=vllm_engine.SamplingParams(max_new_tokens=2))
    assert [c.token_ids for c in groups[0]] == [[3, EOS]]
    assert [call[:2] for call in calls if call[0] != "gc"] == [
        ("sleep", 2), ("wake_up", ("weights",)), ("rpc", "luffy_load_weights"),
        ("reset_prefix_cache",), ("wake_up", ("kv_cache",)), ("generate", [{"prompt_token_ids": [2]}])]


def test_waking_without_a_sync_wakes_the_offloaded_weights_too(make_engine):
    engine, calls = make_engine(sleep_level=1)
    engine.sleep()
    engine.wake()
    assert calls[-1] == ("wake_up", ("kv_cache", "weights"))
    assert "wake_kv_cache_seconds" in engine.metrics()


def test_discarded_weights_or_a_closed_engine_refuse_work(make_engine, monkeypatch):
    monkeypatch.setattr(vllm_engine, "destroy_vllm_process_groups", lambda keep_default: None)
    engine, _ = make_engine()
    engine.sleep()
    with pytest.raises(RuntimeError, match="slept at level 2"):
        engine.score([[1, 2]], [[3]])
    engine.close()
    params = vllm_engine.SamplingParams(max_new_tokens=2)
    for call in (lambda: engine.sync_weights(weights()), engine.wake,
                 lambda: engine.score([[1]], [[2]]), lambda: engine.generate([[1]], 1, params)):
        with pytest.raises(RuntimeError, match="the vLLM engine is closed"):
            call()


def test_only_a_sleep_mode_engine_checks_for_another_in_the_process(make_engine, monkeypatch):
    def occupied():
        raise VLLMStartupError("vLLM allows one sleep-mode engine per process")

    monkeypatch.setattr(vllm_engine, "check_one_sleep_mode_engine", occupied)
    with pytest.raises(VLLMStartupError, match="one sleep-mode engine"):
        make_engine()  # the CUDA default, level 2
    with pytest.raises(VLLMStartupError, match="one sleep-mode engine"):
        make_engine(sleep_level=1)
    assert make_engine(sleep_level=0)[0].sleep_level == 0  # no sleep-mode allocator to share


@pytest.mark.parametrize("initialized", [True, False])
def test_closing_keeps_the_process_group_the_trainer_created(make_engine, monkeypatch, initialized):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    kept = []

    @contextmanager
    def recording_group_kept(keep):
        kept.append(("shutdown", keep))
        yield

    monkeypatch.setattr(vllm_engine, "default_group_kept", recording_group_kept)
    monkeypatch.setattr(vllm_engine, "destroy_vllm_process_groups",
                        lambda keep_default: kept.append(("destroy", keep_default)))
    engine, _ = make_engine()
    engine.close()
    assert kept == [("shutdown", initialized), ("destroy", initialized)]


def test_a_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(VLLMStartupError, match=f"'{tmp_path}' has no config.json .expected a "
                                               "transformers model directory"):
        VLLMRolloutEngine(tmp_path, VLLMConfig(), device=torch.device("cpu"))
