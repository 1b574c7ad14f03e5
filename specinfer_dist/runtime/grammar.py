"""Structured outputs: a request's grammar (JSON schema, JSON object, regex, choice, Lark) as
token masks over the LLM's vocabulary, for every node of a token tree.

The grammar engine is llguidance (a PyPI wheel with no dependencies; it rolls back consumed
tokens and computes forced tokens, which tree verification and grammar drafting need). ``GrammarCompiler`` compiles a constraint once per
distinct constraint for one tokenizer; each request gets a copy of the compiled matcher.

Invariants:
- A ``Grammar`` sits at the state after the request's committed output tokens. Masks for a tree
  node consume the node's path, compute, and roll back: the committed state never moves except
  by ``advance``.
- ``constrain`` never drops a token the grammar allows. A forbidden node proposed as a point mass
  (greedy trees, prompt lookup, forced tokens) is dropped with its subtree: verification could
  never accept it, and dropping it leaves every verification outcome unchanged. A forbidden node
  *drawn* from a q (a drafter that did not mask its q, e.g. a remote draft worker) stays, as a leaf:
  multi-step speculative sampling must still try and reject it (its residual update is part of
  the exact distribution); its own logits row is never used, so it is left unmasked.
- Masks are bitmasks, 32 tokens per int32 word (llguidance's layout): one row per tree node.
- Pruning needs the masks of the nodes that have children; a leaf's mask is needed only to mask
  its logits row, so ``constrain`` leaves it to ``node_masks``, which the engine calls once the
  forward is under way (on a GPU it runs while the device computes; on Ray, while the next
  micro-batch's forward is in flight).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.tree.token_tree import TokenTree

# JSON as json.dumps writes it, no free whitespace: the compact form models are taught, and one
# tokenisation per document, so keys and punctuation are forced (the grammar drafts them). A
# schema's own "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ALL_ALLOWED = -1  # an int32 word with every bit set


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on a request's output, vLLM's ``structured_outputs`` shape: exactly one of
    ``json`` (a JSON schema, as a dict or a string), ``json_object`` (any JSON object), ``regex``,
    ``choice`` (the output is one of these strings) or ``grammar`` (Lark, llguidance's dialect)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise InvalidRequestError(
                "structured outputs take exactly one of json, json_object, regex, choice or grammar"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.json_object not in (True, False):
            raise InvalidRequestError(f"json_object must be a boolean, got {self.json_object!r}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("json must be a JSON schema (an object or a string holding one)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{name} must be a non-empty string")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings")

    def key(self) -> str:
        """A canonical string naming this constraint (the compiled-grammar cache's key)."""
        schema = self.json if isinstance(self.json, str) or self.json is None else json.dumps(self.json, sort_keys=True)
        return json.dumps([schema, self.json_object, self.regex, self.choice, self.grammar])

    def lark(self) -> str:
        """The constraint as an llguidance grammar (its JSON form)."""
        import llguidance

        matcher = llguidance.LLMatcher
        if self.json is not None or self.json_object:
            schema: Any = {"type": "object"} if self.json_object else self.json
            try:
                return matcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            except ValueError as err:
                raise InvalidRequestError(f"invalid JSON schema: {err}") from None
        if self.regex is not None:
            return matcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return matcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """Compiles constraints against one tokenizer (built once, ~0.3 s for a 49k vocabulary) and
    keeps the last ``cache_size`` compiled grammars; ``grammar`` gives a request its own copy."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], cache_size: int = 256) -> None:
        import llguidance.hf

        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        except Exception as err:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
            raise InvalidRequestError(f"structured outputs need a fast tokenizer: {err}") from None
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def grammar(self, params: StructuredOutputsParams) -> "Grammar":
        """A fresh matcher for ``params``; InvalidRequestError with llguidance's reason if the
        constraint is invalid or unsupported, or the tokenizer cannot express it."""
        import llguidance

        key = params.key()
        compiled = self._compiled.get(key)
        if compiled is None:
            source = params.lark()
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer)
            if is_error:
                raise InvalidRequestError(f"invalid structured output constraint: {_one_line(messages[0])}")
            compiled = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
            if compiled.is_error():
                raise InvalidRequestError(f"invalid structured output constraint: {_one_line(compiled.get_error())}")
            if compiled.is_stopped():
                raise InvalidRequestError("the structured output constraint allows no output at all")
            self._compiled[key] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return Grammar(compiled.deep_copy(), self.vocab_size)


class RequestGrammars:
    """Each request's grammar in a process that gets requests' tokens but not their ``Grammar``
    (a Ray draft worker): compiled from the request's constraint the first time, then advanced
    by the output tokens that arrived since."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._compiler_args = (tokenizer, vocab_size, eos_ids)
        self._compiler: GrammarCompiler | None = None
        self._grammars: dict[int, tuple[Grammar, int]] = {}  # request id -> (grammar, output tokens consumed)

    def grammar(self, request_id: int, constraint: StructuredOutputsParams, output: list[int]) -> Grammar:
        grammar, consumed = self._grammars.get(request_id, (None, 0))
        if grammar is None or consumed > len(output):
            self._compiler = self._compiler or GrammarCompiler(*self._compiler_args)
            grammar, consumed = self._compiler.grammar(constraint), 0
        for token in output[consumed:]:
            grammar.advance(token)
        self._grammars[request_id] = (grammar, len(output))
        return grammar

    def release(self, request_id: int) -> None:
        self._grammars.pop(request_id, None)


class GrammarError(RuntimeError):
    """A grammar refused a token it should have allowed, or hit one of its limits."""


class Grammar:
    """A request's grammar at the state after its committed output tokens (see the module
    docstring). Masks are memoised by path until the state advances: drafting asks for the
    masks of the nodes it expands, and verification reuses them."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._masks: dict[tuple[int, ...], np.ndarray | None] = {}

    def advance(self, token: int) -> None:
        """Commit one output token (EOS included: it ends the grammar)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self._masks.clear()

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete and allows nothing more (EOS at most)."""
        return self.matcher.is_stopped()

    def mask(self, path: tuple[int, ...] = ()) -> np.ndarray | None:
        """The bitmask [words] of tokens allowed after ``path`` (tokens past the committed ones);
        None if the grammar forbids ``path`` itself."""
        if path in self._masks:
            return self._masks[path]
        out = self._at(path, self._compute_mask)
        self._masks[path] = out
        return out

    def accepts(self, path: tuple[int, ...]) -> bool:
        """Whether the grammar takes ``path`` whole (what ``mask(path) is not None`` says, without
        computing the mask: consuming a few tokens costs a fraction of a full-vocabulary mask)."""
        if path in self._masks:
            return self._masks[path] is not None
        return self._at(path, lambda: True) is not None

    def _at(self, path: tuple[int, ...], compute: Any) -> Any:
        """``compute()`` with the matcher moved along ``path`` (None if it refuses ``path``), then back."""
        matcher = self.matcher
        consumed = matcher.try_consume_tokens(list(path)) if path else 0
        out = compute() if consumed == len(path) else None
        if consumed:
            matcher.rollback(consumed)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return out

    def _compute_mask(self) -> np.ndarray:
        out = np.empty(self.words, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    def node_masks(self, paths: list[tuple[int, ...] | None]) -> np.ndarray:
        """A bitmask row [len(paths), words] per path ``constrain`` returned: the tokens allowed
        after it (all, for None: a node nothing follows, whose row is never used)."""
        return np.stack([_or_all(None if p is None else self.mask(p), self.words) for p in paths])

    def forbidden(self, paths: list[tuple[int, ...]], device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [len(paths), vocab]: the tokens forbidden after each path (none, for a forbidden path)."""
        return unpack(~self.node_masks(paths), self.vocab_size, device)

    def only_token(self) -> int | None:
        """The one token the grammar allows next, if it allows exactly one: the LLM's masked
        distribution is a point mass there, so it is the next token whatever the logits."""
        words = self.mask().view(np.uint32)
        nonzero = np.flatnonzero(words)
        if len(nonzero) != 1:
            return None
        word = int(words[nonzero[0]])
        return 32 * int(nonzero[0]) + word.bit_length() - 1 if word & (word - 1) == 0 else None

    def forced(self, path: tuple[int, ...], limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces after ``path`` (its only continuation, in
        the tokenizer's canonical tokenisation); empty if none or if ``path`` is forbidden."""
        matcher = self.matcher
        consumed = matcher.try_consume_tokens(list(path)) if path else 0
        tokens = matcher.compute_ff_tokens()[:limit] if consumed == len(path) else []
        if consumed:
            matcher.rollback(consumed)
        return tokens

    def constrain(
        self, tree: TokenTree, max_forced: int = 0, max_depth: int | None = None
    ) -> tuple[TokenTree, list[tuple[int, ...] | None]]:
        """``tree`` without the nodes the grammar forbids (see the module docstring), with up to
        ``max_forced`` forced tokens drafted below its leaves (first leaves in DFS order first; no
        node deeper than ``max_depth``), in DFS order; and each node's path for ``node_masks``
        (None: a node nothing may follow)."""
        out = TokenTree.from_root(tree.tokens[0])
        # None: a node nothing may follow (a kept forbidden draw, EOS): its row stays unmasked,
        # and it is never used (the draw is never accepted; the request ends at the other)
        paths: list[tuple[int, ...] | None] = [()]
        kids = tree.children()
        stack = [(0, 0)]
        while stack:  # DFS: children are kept in their order
            old, new = stack.pop()  # only allowed nodes are pushed: their paths are not None
            path = paths[new]
            mask = self.mask(path) if kids[old] else None
            added = []
            for child in kids[old]:
                token, q = tree.tokens[child], tree.probs[child]
                if _has(mask, token):
                    node = out.add(new, token, q)
                    if not self.accepts((*path, token)):  # EOS, or a token that ends the grammar
                        paths.append(None)
                    else:
                        added.append((child, node))
                        paths.append((*path, token))
                elif q is not None:  # a forbidden draw: tried and rejected by MSS, never descended
                    out.add(new, token, q)
                    paths.append(None)
            stack.extend(reversed(added))
        budget = max_forced
        if budget > 0:
            kids, depths = out.children(), out.depths()
            for leaf in [n for n in range(len(out)) if not kids[n] and paths[n] is not None]:
                node, path = leaf, paths[leaf]
                room = budget if max_depth is None else min(budget, max_depth - depths[leaf])
                for token in self.forced(path, room) if room > 0 else []:
                    node = out.add(node, token)
                    path = (*path, token)
                    paths.append(path)
                    budget -= 1
                if budget <= 0:
                    break
            if budget < max_forced:  # forced chains were appended after the DFS order
                order = out.dfs_order()
                out, paths = out.dfs(), [paths[i] for i in order]
        return out, paths


def _one_line(message: str) -> str:
    """llguidance's reason without its source diagram (lines of the input and a caret): errors are one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])


def _has(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def _or_all(mask: np.ndarray | None, words: int) -> np.ndarray:
    return mask if mask is not None else np.full(words, ALL_ALLOWED, dtype=np.int32)


@functools.lru_cache(maxsize=8)
def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


def unpack(bits: np.ndarray, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [..., vocab] on ``device`` from bitmasks [..., words] (bit j of word w is token
    32 w + j). On the host numpy unpacks into bytes that are the bools (no copy; much cheaper
    there than tensor shifts); for another device the packed words travel, 8x fewer bytes, and
    are unpacked there. Invert the words, not the bools, to get the other set: 32x fewer."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")).view(torch.bool)[..., :vocab_size]
    words = torch.from_numpy(bits).to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> _shifts(words.device)) & 1).bool().flatten(-2)[..., :vocab_size]


def mask_logits(logits: torch.Tensor, ranges: list[tuple[int, int]], bits: np.ndarray) -> None:
    """Set -inf, in place, at every token the bitmasks forbid: ``bits`` holds one row for each row
    of ``logits`` in the ``ranges`` ([start, end) row spans, in order)."""
    forbidden = unpack(~bits, logits.shape[1], logits.device)
    first = 0
    with torch.inference_mode():  # the forward's logits are inference tensors
        for start, end in ranges:
            logits[start:end].masked_fill_(forbidden[first : first + end - start], float("-inf"))
            first += end - start
