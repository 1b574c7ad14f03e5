"""The bench command end to end on a tiny model: every mode runs and greedy ones agree."""

import json

import pytest

from helpers import make_tiny_checkpoint

from specinfer_dist.cli import main


def test_bench_writes_summary_with_ratios(tmp_path, capsys):
    llm = make_tiny_checkpoint(tmp_path, "llama", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello hello hello", "abc abc", "xyz"]))
    out = tmp_path / "out"
    modes = "incremental,sequence,tree,tree-full-vocab,ngram,merged,tree-mss,tree-naive,hf,hf-assisted"
    code = main(["bench", "--llm", str(llm), "--ssm", str(llm), "--tree", "1,2,1", "--modes", modes,
                 "--prompts", str(prompts), "--max-tokens", "12", "--out", str(out), "--sweep"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    assert set(summary) == set(modes.split(","))
    for mode, s in summary.items():
        assert s["tokens_per_s"] > 0 and "speedup_vs_incremental" in s and "speedup_vs_hf" in s
        assert s["generated_tokens"] == sum(len(o) for o in result["outputs"][mode]) == 3 * 12
        assert s["peak_rss_mb"] > 100  # torch alone is more
        if not mode.endswith(("-mss", "-naive")):
            assert s["outputs_equal_reference"] == 3, mode  # greedy: identical outputs in every mode
    # The LLM drafting for itself: every draft is accepted, so a step yields the whole tree depth + 1.
    assert summary["sequence"]["tokens_per_step"] > 2.5
    # Counted independently: 12 tokens per prompt, 4 per step (3 accepted + the LLM's own) = 3 steps.
    assert summary["tree"]["verification_steps"] == 3 * 3
    assert summary["incremental"]["tokens_per_step"] == summary["hf"]["tokens_per_step"] == 1.0
    assert summary["hf-assisted"]["tokens_per_step"] > 1.5  # HF counts its assisted steps the same way
    assert len(summary["tree"]["acceptance_by_depth"]) == 3
    assert summary["tree"]["tree"] == "1,2,1" and summary["merged"]["drafters"] == ["ssm0", "ngram"]
    assert summary["incremental"]["tree"] == "" and summary["incremental"]["drafters"] == []
    assert "| tree |" in capsys.readouterr().out
    assert set(result["verify_cost_s"]) == {"128", "512", "1024"}
    for png in ("tokens_per_step.png", "speedup_vs_incremental.png", "verify_cost.png"):
        assert (out / png).stat().st_size > 1000


def test_synthetic_gpu_bench_smoke_on_cpu(tmp_path):
    from specinfer_dist.bench import synthetic

    # bf16, as on a GPU: the random LLM's argmax must survive bf16 rounding (realised acceptance checked).
    args = ["--shapes", "tiny", "--max-tokens", "12", "--prompt-len", "8", "--dtype", "bfloat16", "--out", str(tmp_path),
            "--batches", "1,8", "--alphas", "0.6,0.8", "--skip-hf"]
    assert synthetic.main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())["tiny"]
    for batch in ("batch1", "batch8"):
        for name, row in result[batch].items():
            if "realised_acceptance" in row:
                assert row["realised_acceptance"] == pytest.approx(row["drafter_hit_rate"]), (batch, name)
    assert set(result["verify_cost_s"]) == {"512", "2048"}
    for batch in ("batch1", "batch8"):
        rows = result[batch]
        assert rows["incremental"]["tokens_per_step"] == 1.0
        # Higher acceptance, more tokens per step: the synthetic drafter does what it says.
        assert rows["sequence-alpha0.8"]["tokens_per_step"] > rows["sequence-alpha0.6"]["tokens_per_step"] > 1.0


def test_prefix_cache_bench_smoke(tmp_path):
    """The prefix-caching bench at a tiny scale: every scenario runs caching on and off, the
    answers agree, and the counts it reports add up (speed is not checked)."""
    from serve_helpers import make_chat_checkpoint

    from specinfer_dist.bench import prefix_cache

    llm = make_chat_checkpoint(tmp_path)
    result = prefix_cache.run(str(llm), users=2, turns=2, max_tokens=4, system_tokens=120, batch=4, prefix_tokens=64,
                              suffix_tokens=8, memory_users=2, memory_turns=2)
    assert result["system_prompt_tokens"] >= 120 and result["targets"]["outputs_equal"]
    chat = result["multi_turn"]
    assert chat["outputs_equal"] and chat["requests_equal"] == "4/4"
    for name in ("on", "off"):
        s = chat[name]
        assert len(s["requests"]) == 4 and s["prefix_cache_queries"] == s["prompt_tokens"]
        assert s["ttft_turn1_p50_s"] > 0 and s["ttft_later_turns_p99_s"] > 0 and s["total_tokens_per_s"] > 0
        assert s["pool_at_end"]["num_used"] == 0 and s["pool_at_end"]["caches_left"] == 0  # nothing leaked
    assert chat["off"]["prefix_cache_hits"] == 0 and chat["off"]["pool_at_end"]["num_cached"] == 0
    # The second user's first turn and every second turn find the system prompt (and more) cached.
    assert chat["on"]["prefix_cache_hits"] >= 3 * 112 and chat["on"]["hit_rate"] > 0.5
    batch = result["shared_prefix"]
    assert batch["outputs_equal"] and batch["requests"] == 4
    for name in ("on", "off"):  # forward rows counted in the LLM = what the outputs say was not cached
        assert batch[name]["prompt_rows_computed"] == batch[name]["prompt_tokens_minus_cached"]
    assert batch["off"]["prompt_rows_computed"] == 4 * 72
    # At least the first request computes its whole prompt; the last ones take the 4 prefix blocks
    # (how many take them depends on what ran in the same step).
    assert 72 + 8 <= batch["on"]["prompt_rows_computed"] < batch["off"]["prompt_rows_computed"]
    memory = result["memory"]
    assert memory["outputs_equal"] and memory["pool_smaller_than_histories"]
    assert memory["on"]["pool_at_end"]["kv_blocks"] == memory["kv_blocks"]
    assert set(result["targets"]) >= {"ttft_later_turns_p50_ratio_le_0.25", "throughput_ratio_ge_1.5",
                                      "prompt_rows_ratio_le_0.125"}


def test_structured_bench_smoke(tmp_path):
    """The structured-outputs bench at a tiny scale: every setup runs on 2 schema prompts, greedy
    outputs agree across setups, and the files and the grammar-overhead numbers are written."""
    from serve_helpers import make_chat_checkpoint

    from specinfer_dist.bench import structured

    llm = make_chat_checkpoint(tmp_path)
    out = tmp_path / "out"
    code = structured.main(["--llm", str(llm), "--ssm", str(llm), "--limit", "2", "--max-tokens", "12", "--batches", "2",
                            "--tree", "1,1,1", "--overhead-batch", "2", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert "| tree+grammar |" in (out / "results.md").read_text()
    batch = result["batches"]["2"]
    assert batch["outputs_equal"] and result["outputs_equal"]
    assert list(batch["summary"]) == list(structured.SETUPS)
    outputs = [batch["setups"][s]["outputs"] for s in structured.SETUPS]
    assert all(o == outputs[0] for o in outputs) and len(outputs[0]) == 2
    summary = batch["summary"]
    for s in summary.values():
        assert s["outputs_equal_baseline"] == "2/2" and s["tokens_per_s"] > 0 and 0 <= s["valid_json_pct"] <= 100
    assert summary["incremental"]["tokens_per_step"] == 1.0 and summary["incremental"]["forced_tokens"] == 0
    assert summary["tree"]["tokens_per_step"] > 1.5  # the LLM drafting for itself: every draft is accepted
    assert summary["incremental+grammar"]["forced_tokens"] > 0  # '{"' and the first key are forced
    overhead = result["grammar_overhead"]
    assert overhead["batch"] == 2 and 0 < overhead["grammar_s"] < overhead["step_s"]
    assert {"Grammar.constrain", "mask_logits"} <= set(overhead["by_function_s"])


def test_structured_served_summary_fails_invalid_replies_and_counts_length_cuts_apart():
    from specinfer_dist.bench import structured

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}
    names = ["ok", "bad_json", "bad_schema", "cut", "error"]
    rows = [{"name": name, "prompt": "p", "schema": schema} for name in names]
    replies = [{"name": name, "finish_reason": reason, "latency_s": 1.0, "completion_tokens": 4, "text": text}
               for name, reason, text in [("ok", "stop", '{"n": 2}'), ("bad_json", "stop", '{"n": 2'),
                                          ("bad_schema", "stop", '{"n": 7}'), ("cut", "length", '{"n"')]]
    replies.append({"name": "error", "finish_reason": "error", "error": "APIConnectionError", "latency_s": 3.0})
    summary = structured.served_summary(rows, replies)
    assert [r["valid"] for r in replies] == [True, False, False, False, False]
    assert (summary["valid"], summary["valid_pct"], summary["num_prompts"]) == (1, 20.0, 5)
    assert summary["failed"] == ["bad_json", "bad_schema", "error"] and summary["length_cut"] == ["cut"]
    assert summary["finish_reasons"] == {"error": 1, "length": 1, "stop": 3}
    assert summary["completion_tokens"] == 16 and summary["latency_max_s"] == 3.0
