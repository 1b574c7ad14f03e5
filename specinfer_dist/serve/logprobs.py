"""Per-token log-probabilities in OpenAI's shapes: the one place that asks for them and the one
place that turns the engine's per-token entries into what chat and completions return.

The engine attaches to each ``RequestDelta`` a ``logprobs`` list with one ``TokenLogprob`` per
token of ``token_ids`` when the request's SamplingParams ask for them (``logprobs``: how many
alternatives). They are the LLM's raw log-softmax at each emitted token (as OpenAI and vLLM
report them), from the verification logits, so speculation cannot change them.

Shapes (OpenAI's; streamed chunks carry the entries of their own tokens):

- chat ``choices[].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}]}``;
- completions ``choices[].logprobs``: ``{tokens, token_logprobs, top_logprobs: [{token:
  logprob}], text_offset}``, offsets counted in characters from the start of the choice's text
  and continued across a stream's chunks.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from specinfer_dist.runtime.sampling_params import MAX_LOGPROBS
from specinfer_dist.serve.api_errors import ApiError


class TokenLogprob(Protocol):
    """What the engine reports for one generated token."""

    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]  # the most likely tokens (id, logprob), best first


def top_logprobs_requested(top: int | None, param: str = "logprobs") -> int | None:
    """``top``: how many alternatives per token a request wants (0: the chosen token's logprob
    only), None when it wants no logprobs. Every protocol asks here."""
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {top}", param=param)
    return top


class LogprobsFormatter:
    """Turns each choice's per-token entries into OpenAI's chat or completions shape."""

    def __init__(self, tokenizer: Any, top: int, chat: bool) -> None:
        self.tokenizer, self.top, self.chat = tokenizer, top, chat
        self._offsets: dict[int, int] = {}  # completions: text offset reached, per choice

    def format(self, choice: int, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return self._chat(entries) if self.chat else self._completion(choice, entries)

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[: self.top]]}
            for e in entries
        ]}

    def _completion(self, choice: int, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens = [self._token(e.token_id) for e in entries]
        offsets, offset = [], self._offsets.get(choice, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._offsets[choice] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in e.top[: self.top]} for e in entries],
            "text_offset": offsets,
        }
