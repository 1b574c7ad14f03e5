"""The Ray runtime: exact across tensor parallelism and pipelining, under load, and through
worker and shard failures; a feature drafter co-located in the coordinator, fed by shard rank 0;
tensor parallelism itself against the unsharded model.

One private Ray instance serves the module. GPUs are simulated by a custom resource, so
placement is exercised as on a GPU cluster while shards run on CPU with gloo.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest
import ray
import torch
import transformers
from eagle3_helpers import make_feature_models
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from ray.util.placement_group import remove_placement_group
from test_engine_exact import noisy_copy
from tp_helpers import assert_shards_match

from specinfer_dist import InvalidConfigError, InvalidRequestError, LLMEngine, ModelLoadError, SamplingParams
from specinfer_dist.cli import main
from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed import Coordinator, CoordinatorClient
from specinfer_dist.distributed.pipeline import PipelinedEngine
from specinfer_dist.distributed.placement import (
    actor_options,
    bundles,
    coordinator_options,
    reserve,
    stage_device,
)
from specinfer_dist.distributed.tp import shard_model
from specinfer_dist.distributed.verifier_shard import ShardGroupVerifier
from specinfer_dist.engine.async_engine import EngineStepError
from specinfer_dist.engine.builder import build_parts
from specinfer_dist.models.loader import load_model
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.runtime.model_runner import chain_parents
from specinfer_dist.runtime.verifier import LocalVerifier, VerifyItem

SIM_GPU = "sim_gpu"
TREE = "1,2,1,1"
FEATURE_TREE = "2,1,1"
FEATURE_BUDGET = 24  # LLM rows per step: longer prompts are prefilled in chunks, whose hidden states are read too


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1)
    ssm = noisy_copy(llm, tmp / "ssm", noise=0.3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    local = LLMEngine.load(str(llm), ssms=[str(ssm)], tree=TREE)
    return EngineConfig(llm=str(llm), ssms=[str(ssm)], tree=TREE), local, hf


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's one Ray instance."""
    # Logical CPUs: every module-scoped runtime (TP=1, TP=2, the feature drafter's TP=2) stays placed
    # while the slow TP=3 test places its own.
    ray.init(address="local", num_cpus=32, resources={SIM_GPU: 4}, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clients(models, ray_cluster):
    """A TP=1 runtime without pipelining and a TP=2 one (a real gloo group) with it."""
    engine_config = models[0]
    base = ClusterConfig(gpu_resource=SIM_GPU, step_timeout_s=60)
    # TP=2 also places its draft worker on half a (simulated) GPU.
    configs = {1: replace(base, tp=1, pipeline=False), 2: replace(base, tp=2, gpus_per_draft_worker=0.5)}
    handles = {tp: Coordinator.remote(engine_config, cluster) for tp, cluster in configs.items()}  # start in parallel
    started = {tp: CoordinatorClient(handle) for tp, handle in handles.items()}
    yield started
    for client in started.values():
        client.shutdown()


def reference(local: LLMEngine, batch: list[list[int]], params) -> list[list[int]]:
    return [out.token_ids for out in local.generate(batch, params)]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (m,), generator=gen).tolist() for m in torch.randint(3, 40, (n,), generator=gen).tolist()]


async def collect(client, prompt, params) -> tuple[list[int], list]:
    deltas = [d async for d in client.generate(prompt, params)]
    return [t for d in deltas for t in d.token_ids], deltas


def run_all(client, batch, params) -> list[tuple[list[int], list]]:
    async def main():
        return await asyncio.gather(*(collect(client, p, sp) for p, sp in zip(batch, params)))

    return asyncio.run(main())


Forward = tuple[torch.Tensor, list[torch.Tensor] | None]  # logits, hidden states (or None)


class EagerVerifier(LocalVerifier):
    """The local stage with the remote one's submit/collect (its forward runs at submit)."""

    def submit(self, items: list[VerifyItem], aux_layers: Sequence[int] = ()) -> Forward:
        return self.logits_hidden(items, aux_layers) if aux_layers else (self.logits(items), None)

    def collect(self, done: Forward) -> Forward:
        return done


def test_greedy_identical_across_runtimes(models, clients):
    config, local, hf = models
    batch = prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 5, 31, 12, 1, 24)]
    want = reference(local, batch, params)
    parts = build_parts(config)
    parts.verifier = EagerVerifier(parts.verifier.runner.model)
    pipelined = PipelinedEngine(**vars(parts))
    runs = {"local pipelined": [o.token_ids for o in pipelined.generate(batch, params)]}
    for tp, client in clients.items():
        results = run_all(client, batch, params)
        runs[f"ray tp={tp}"] = [tokens for tokens, _ in results]
        assert sum(deltas[-1].stats.accepted_tokens for _, deltas in results) > 0  # drafts came from the workers
    for name, outs in runs.items():
        for prompt, got, ref in zip(batch, outs, want):
            assert len(got) == len(ref), name
            assert_greedy_equal(hf, prompt, got, ref)
    assert clients[2].info()["pipeline"] and not clients[1].info()["pipeline"]


def test_concurrent_mixed_requests(models, clients):
    _, local, hf = models
    batch = prompts(18, seed=3)
    params = []
    for i in range(len(batch)):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=i, max_tokens=4 + 2 * i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=1 + (7 * i) % 30, ignore_eos=i % 2 == 0))
    first = run_all(clients[2], batch, params)
    # Again, in reverse order: other batch mates at every step.
    second = run_all(clients[2], batch[::-1], params[::-1])[::-1]
    for prompt, sp, (got, deltas), (again, _) in zip(batch, params, first, second):
        assert deltas[-1].finished and got == again
        if sp.greedy:
            [solo] = reference(local, [prompt], sp)
            assert_greedy_equal(hf, prompt, got, solo)
    assert clients[2].num_running() == 0 and clients[2].num_waiting() == 0
    assert clients[2].counters.requests_finished >= 2 * len(batch)


def test_draft_worker_death_keeps_output_exact(models, clients):
    _, local, hf = models
    client = clients[1]
    [worker] = client.actors()["draft_workers"]
    pid = ray.get(worker.ready.remote())
    batch = prompts(4, seed=7)
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    want = reference(local, batch, params)

    async def main():
        streams = [client.generate(p, params) for p in batch]
        firsts = [await stream.__anext__() for stream in streams]  # all under way
        ray.kill(worker, no_restart=False)
        rests = [[d async for d in stream] for stream in streams]
        return [[first, *rest] for first, rest in zip(firsts, rests)]

    for prompt, deltas, ref in zip(batch, asyncio.run(main()), want):
        assert len(deltas) > 2 and deltas[-1].finished  # they went on after the kill
        assert_greedy_equal(hf, prompt, [t for d in deltas for t in d.token_ids], ref)
    assert restarted_pid(worker) != pid  # Ray restarted it
    for _ in range(3):  # and drafting resumes once it is back
        [(_, deltas)] = run_all(client, batch[:1], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)])
        if deltas[-1].stats.accepted_tokens:
            break
        time.sleep(1)
    assert deltas[-1].stats.accepted_tokens > 0


def restarted_pid(worker, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(worker.ready.remote())
        except ray.exceptions.ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_cli_ray_gives_the_local_json(models, clients, capsys):
    engine_config = models[0]
    args = ["generate", "--prompt", "hello world", "--llm", engine_config.llm, "--ssm", engine_config.ssms[0],
            "--tree", TREE, "--max-tokens", "12", "--ignore-eos", "--json", "--temperature", "0"]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    # Ray is already up in this process, so --ray joins it (a fresh process would start its own).
    assert main([*args, "--ray", "--tp", "1", "--no-pipeline"]) == 0
    remote = json.loads(capsys.readouterr().out)
    for timing in ("elapsed_s", "ms_per_token"):
        local.pop(timing), remote.pop(timing)
    assert remote == local


def test_disconnect_aborts_on_the_coordinator(clients):
    client = clients[1]

    async def main():
        stream = client.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(100):
            if client.num_running() == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    assert asyncio.run(main())


def test_bad_model_fails_cleanly_at_start(models, clients):
    engine_config = models[0]
    with pytest.raises(ModelLoadError, match="no-such-ssm"):
        CoordinatorClient.from_config(replace(engine_config, ssms=["/no-such-ssm"]), ClusterConfig(pipeline=False))


def test_verifier_shard_death_fails_in_flight_then_recovers(models, clients):
    _, local, hf = models
    client = clients[2]
    old = client.actors()["shards"]
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        streams = [client.generate(p, params) for p in prompts(3, seed=11)]
        for stream in streams:
            await stream.__anext__()
        ray.kill(old[1])
        start = time.monotonic()
        errors = await asyncio.gather(*(asyncio.wait_for(drain(s), 30) for s in streams), return_exceptions=True)
        return errors, time.monotonic() - start

    async def drain(stream):
        async for _ in stream:
            pass

    errors, waited = asyncio.run(main())
    assert all(isinstance(e, EngineStepError) and "verifier shard group failed" in str(e) for e in errors), errors
    assert waited < 30
    prompt = prompts(1, seed=12)[0]
    [(got, _)] = run_all(client, [prompt], [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)])
    [want] = reference(local, [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert_greedy_equal(hf, prompt, got, want)
    assert set(client.actors()["shards"]).isdisjoint(old)  # a new group


def test_draft_workers_hold_no_llm_weights(clients):
    # Their SSMs (noisy copies) share nothing with the LLM, so not one LLM tensor is read.
    for client in clients.values():
        for worker in client.actors()["draft_workers"]:
            assert ray.get(worker.llm_tensors.remote()) == {}


def test_colocated_drafters_and_tree_auto_on_the_verifier(models, clients):
    # tree: auto is measured by the verifier shard (a draft side given "auto" refuses to start),
    # and the drafters run inside the coordinator: still exact, still no LLM weights beside the shard.
    engine_config, local, hf = models
    cluster = ClusterConfig(tp=1, gpus_per_shard=0, colocate_drafters=True, pipeline=False, step_timeout_s=60)
    client = CoordinatorClient(Coordinator.options(**coordinator_options(cluster)).remote(replace(engine_config, tree="auto"), cluster))
    try:
        info = client.info()
        assert info["colocated_drafters"] and client.actors()["draft_workers"] == []
        assert info["mode"] == "incremental" or all(w >= 1 for w in info["spec"].widths)
        assert ray.get(client.coordinator.llm_tensors.remote()) == {}
        batch = prompts(3, seed=5)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        for prompt, (got, _), want in zip(batch, run_all(client, batch, [params] * 3), reference(local, batch, params)):
            assert_greedy_equal(hf, prompt, got, want)
    finally:
        client.shutdown()


# ---- a feature drafter (EAGLE-3 head) in the coordinator, fed by verifier rank 0 --------------


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    llm, head = make_feature_models(tmp_path_factory.mktemp("dist-feature"))
    config = EngineConfig(llm=str(llm), ssms=[], feature_drafter=str(head), tree=FEATURE_TREE,
                          max_num_batched_tokens=FEATURE_BUDGET)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return config, LLMEngine.from_config(config), hf


@pytest.fixture(scope="module")
def feature_client(feature_models, ray_cluster):
    """TP=2 (a real gloo group), a forward always in flight, the head drafting in the coordinator."""
    cluster = ClusterConfig(tp=2, gpus_per_shard=0, colocate_drafters=True, pipeline=True, step_timeout_s=60)
    client = CoordinatorClient(Coordinator.options(**coordinator_options(cluster)).remote(feature_models[0], cluster))
    yield client
    client.shutdown()


def feature_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 24, (n,), generator=gen).tolist() for n in lengths]  # the tiny word vocabulary


def test_feature_drafter_on_ray_tp2_pipelined_equals_transformers(feature_models, feature_client):
    _, local, hf = feature_models
    info = feature_client.info()
    assert info["colocated_drafters"] and info["pipeline"] and info["mode"] == "tree"
    assert len(feature_client.actors()["shards"]) == 2 and feature_client.actors()["draft_workers"] == []
    batch = feature_prompts([7, 40, 3, 18, 31, 12])  # 40 and 31 are prefilled in chunks
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (20, 14, 24, 1, 16, 20)]
    results = run_all(feature_client, batch, params)
    for prompt, sp, (got, _), ref in zip(batch, params, results, reference(local, batch, params)):
        assert_greedy_equal(hf, prompt, got, ref)
        assert_greedy_equal(hf, prompt, got, hf_greedy(hf, prompt, sp.max_tokens))
    stats = [deltas[-1].stats for _, deltas in results]
    assert sum(s.drafted_tokens for s in stats) > 0  # the head drafted from the shards' hidden states
    assert sum(s.generated_tokens for s in stats) / sum(s.steps for s in stats) > 1  # and was accepted


def test_feature_drafter_on_ray_drafts_what_it_drafts_locally(feature_models, feature_client):
    # One request at a time, so every step (chunks included) is the local engine's: fed by rank 0
    # of a TP=2 group through the pipeline, the head drafts and gets accepted exactly as locally.
    _, local, hf = feature_models
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for prompt in feature_prompts([5, 50, 17], seed=1):  # 50 tokens: two chunks, then the rest with a tree
        [(got, deltas)] = run_all(feature_client, [prompt], [params])
        [want] = local.generate([prompt], params)
        assert_greedy_equal(hf, prompt, got, want.token_ids)
        assert deltas[-1].stats == want.stats
    assert want.stats.accepted_tokens > 0


def test_shard_group_returns_whole_hidden_states_from_rank0(feature_models, ray_cluster):
    # The contract of LocalVerifier.logits_hidden, over a TP=2 group: the residual stream rank 0
    # captures is whole (replicated after each all-reduce), not a slice.
    config, local, _ = feature_models
    cluster = ClusterConfig(tp=2, gpus_per_shard=0, colocate_drafters=True, step_timeout_s=60)
    [group] = reserve(cluster)
    shards = ShardGroupVerifier(replace(config, device="cpu"), cluster, group)
    here = LocalVerifier(local.verifier.runner.model)
    steps = [  # (items, then the rows each request keeps)
        ([VerifyItem(0, [5, 9, 13, 21, 7], chain_parents(5), [4]), VerifyItem(1, [8, 6], [-1, 0], [0, 1])],
         [(0, [0, 1, 2, 3, 4]), (1, [0, 1])]),
        ([VerifyItem(0, [12, 13, 14, 15], [-1, 0, 0, 1], [0, 1, 2, 3]), VerifyItem(1, [9], [-1], [0])],
         [(0, [0, 1]), (1, [0])]),
    ]
    try:
        for items, keeps in steps:
            want_logits, want_hidden = here.logits_hidden(items, local.aux_layers)
            got_logits, got_hidden = shards.logits_hidden(items, local.aux_layers)
            torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)  # all-reduce order
            width = 3 * here.runner.model.config.hidden_size  # three whole layers, not slices
            assert [h.shape for h in got_hidden] == [(len(item.tokens), width) for item in items]
            for got, want in zip(got_hidden, want_hidden, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for request_id, keep in keeps:
                here.commit(request_id, keep)
                shards.commit(request_id, keep)
        _, hidden = shards.collect(shards.submit([VerifyItem(0, [3], [-1], [0])]))
        assert hidden is None  # not asked for: not shipped
    finally:
        shards.shutdown()
        remove_placement_group(group)


def test_feature_drafter_without_colocation_is_a_clear_error(feature_models, ray_cluster):
    with pytest.raises(InvalidConfigError, match="colocate_drafters"):
        CoordinatorClient(Coordinator.remote(feature_models[0], ClusterConfig(pipeline=False)))


@pytest.mark.slow
def test_default_llm_tp3_greedy_equals_transformers(clients):
    # SmolLM2-135M: 9 heads, 3 KV heads -> TP=3. Its shipped SSMs share the embedding (= the tied
    # head): the draft worker holds exactly that tensor of the LLM, and drafting happens.
    from specinfer_dist.models.default import default_llm_dir

    llm_dir = default_llm_dir(progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    cluster = ClusterConfig(tp=3, draft_workers=1, gpus_per_shard=0, step_timeout_s=300)
    client = CoordinatorClient(Coordinator.remote(EngineConfig(tree="1,1,3,1,1,1,1,1"), cluster))
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        batch = [tokenizer(text).input_ids for text in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
        results = run_all(client, batch, [params] * len(batch))
        for prompt, (got, _) in zip(batch, results):
            assert_greedy_equal(hf, prompt, got, hf_greedy(hf, prompt, 24))
        steps = sum(deltas[-1].stats.steps for _, deltas in results)
        assert sum(len(got) for got, _ in results) / steps > 1  # tokens per step: the SSMs' drafts were accepted
        [worker] = client.actors()["draft_workers"]
        assert ray.get(worker.llm_tensors.remote()) == {"model.embed_tokens.weight": "cpu"}
    finally:
        client.shutdown()


def test_gpu_placement_bundles_and_devices():
    cluster = ClusterConfig(tp=2, draft_workers=2, gpus_per_shard=1, gpus_per_draft_worker=0.5)
    shards, drafts = bundles(cluster)
    assert shards == [{"CPU": 1, "GPU": 1}] * 2 and drafts == [{"CPU": 1, "GPU": 0.5}] * 2
    assert stage_device(cluster, 1) == stage_device(cluster, 0.5) == "cuda" and stage_device(cluster, 0) == "cpu"
    assert actor_options(cluster, None, 0, 1, 0.5)["num_gpus"] == 0.5  # Ray then sets CUDA_VISIBLE_DEVICES
    simulated = replace(cluster, gpu_resource=SIM_GPU)
    assert bundles(simulated)[1] == [{"CPU": 1, SIM_GPU: 0.5}] * 2
    assert stage_device(simulated, 1) == "cpu"  # a simulated GPU computes on the CPU
    assert actor_options(simulated, None, 0, 1, 0.5)["resources"] == {SIM_GPU: 0.5}
    assert bundles(replace(cluster, gpus_per_draft_worker=0))[1] == [{"CPU": 1}] * 2
    colocated = replace(cluster, colocate_drafters=True)
    assert bundles(colocated)[1] == [] and coordinator_options(colocated)["num_gpus"] == 0.5
    assert "num_gpus" not in coordinator_options(cluster)


# ---- tensor parallelism, without Ray ------------------------------------------------------


def test_tensor_parallel_shards_match_unsharded_model(tmp_path):
    # qwen2: q/k/v biases; tied head; a vocabulary that does not split evenly; GQA 4/2 heads.
    # llama with biases everywhere: o_proj's and down_proj's bias and the residual, each added once.
    # Every other family: tests/test_architectures.py.
    assert_shards_match([make_tiny_checkpoint(tmp_path, "qwen2", vocab_size=261, tie_word_embeddings=True),
                         make_tiny_checkpoint(tmp_path, "llama", attention_bias=True, mlp_bias=True)], tmp_path)


def test_tensor_parallel_must_divide_heads(tmp_path):
    model, _, _ = load_model(str(make_tiny_checkpoint(tmp_path, "llama")), progress=False)
    with pytest.raises(InvalidConfigError, match="KV heads"):
        shard_model(model, 0, 4)  # 4 query heads, 2 KV heads


def test_prefix_caching_on_ray_gives_the_local_outputs(models, clients):
    """Overlapping prompts, one after another and then all at once: on the TP=1 runtime and the
    pipelined TP=2 one the coordinator reuses cached prefixes, every shard follows its block
    tables (a step whose shards hold other tables fails: verifier_shard.py), outputs equal the
    local engine's without caching, and every block goes back."""
    config, _, _ = models
    local = LLMEngine.from_config(replace(config, enable_prefix_caching=False))
    gen = torch.Generator().manual_seed(11)
    stem = torch.randint(4, 260, (40,), generator=gen).tolist()
    batch = [stem[:n] + torch.randint(4, 260, (k,), generator=gen).tolist() for n, k in
             [(40, 3), (35, 0), (40, 3), (17, 5), (33, 9), (40, 0)]]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(batch)
    want = reference(local, batch, params)
    for client in clients.values():
        hits = client.counters.prefix_cache_hits
        one_by_one = [run_all(client, [p], [sp])[0][0] for p, sp in zip(batch, params)]
        together = [tokens for tokens, _ in run_all(client, batch, params)]
        assert one_by_one == want and together == want
        assert client.counters.prefix_cache_hits - hits >= 4 * 32  # later prompts reuse the 2 full stem blocks
        assert client.kv_usage() == 0.0


def test_structured_outputs_on_ray_give_the_local_outputs(models, clients):
    """Constrained requests (greedy under a JSON schema, seeded sampling under a regex, a choice)
    mixed with a free one: the coordinator masks the logits the shards return and prunes the
    trees its draft workers send (they draft unmasked), and the outputs are the local engine's.
    A bad constraint is refused there and the runtime keeps serving."""
    config, _, _ = models
    local = LLMEngine.from_config(replace(config, enable_prefix_caching=False))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    batch = prompts(4, seed=5)
    params = [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=0.9, seed=3, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[a-f]{4,9}")),
        SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    ]
    want = reference(local, batch, params)
    assert json.loads(local.decode(want[0])).keys() == {"n", "ok"} and local.decode(want[2]) in ("yes", "no")
    for client in clients.values():
        assert [tokens for tokens, _ in run_all(client, batch, params)] == want
        with pytest.raises(InvalidRequestError, match="unclosed group"):
            run_all(client, batch[:1], [SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b"))])
        assert [run_all(client, [p], [sp])[0][0] for p, sp in zip(batch, params)] == want
