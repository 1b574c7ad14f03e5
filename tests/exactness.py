"""Greedy exactness against Hugging Face generate(), with near-ties proven rather than assumed."""

from __future__ import annotations

import torch

NEAR_TIE = 1e-4  # top-2 logit gap below which fp32 rounding may legitimately pick either token


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=hf_model.config.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def assert_greedy_equal(hf_model, prompt_ids: list[int], ours: list[int], ref: list[int]) -> None:
    """``ours == ref``, or they diverge at a position where the LLM's top-2 logits are a near-tie."""
    if ours == ref:
        return
    i = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + ref[:i]])).logits[0, -1]
    top = logits.topk(2)
    gap = (top.values[0] - top.values[1]).item()
    assert gap < NEAR_TIE and i < len(ours) and ours[i] in top.indices.tolist(), (
        f"greedy output diverges from transformers at token {i} where the top-2 logit gap is {gap:.3g}:\n"
        f"ours={ours}\nref ={ref}"
    )
