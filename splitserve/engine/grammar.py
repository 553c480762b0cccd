"""Structured output in the engine: a request's StructuredOutput becomes a token mask,
applied to its logits row before every sample (xgrammar, the library vLLM uses).

- GrammarCache (one per engine): compiles a StructuredOutput for this engine's tokenizer
  once and keeps the result in a bounded LRU, keyed by (kind, spec). The tokenizer is
  loaded on the first structured request, not at start-up: most workers never need it.
  Thread-safe, so a worker compiles ahead on another thread (worker/async_engine.py) and
  the engine thread then only finds the result.
- GrammarState (one per request): an xgrammar matcher and how many output tokens it has
  accepted. It catches up with the request's output right before each mask, so it never
  needs to be told about a token: the first token sampled by a prefill worker, a
  migrated request's output so far (the prompt's last resumed_output_tokens tokens) and a
  preempted request's recompute all come out right by construction.
- mask_rows: fills one bitmask for the batch and applies it in place. The grammar lets
  the stop tokens (the engine's EOS ids) through only where the output may end.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from splitserve.engine.errors import RequestError
from splitserve.structured_output import StructuredOutput, compile_error_reason

logger = logging.getLogger(__name__)

# Compiled grammars kept per engine. A compiled JSON schema holds a few MB at most.
DEFAULT_CAPACITY = 128


class GrammarCache:
    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: tuple[int, ...],
                 capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._tokenizer_dir = str(tokenizer_dir)
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._capacity = capacity
        self._lock = threading.Lock()
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                # Slow imports (transformers, xgrammar): only once a request needs them.
                import xgrammar as xgr
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_dir)
                except Exception as e:  # noqa: BLE001 - any reason: no structured output here
                    raise RequestError(f"structured output needs the model's tokenizer, which "
                                       f"could not be loaded from {self._tokenizer_dir}: {e}",
                                       "response_format") from e
                # The engine's stop tokens, not the tokenizer's: the grammar must let through
                # exactly the tokens that end a request in this engine.
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids)
                # cache_enabled=False: this class is the (bounded) cache.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                logger.info("grammar compiler ready for %s (vocab %d, stop tokens %s)",
                            self._tokenizer_dir, self._vocab_size, self._stop_token_ids)
            return self._compiler

    def compile(self, so: StructuredOutput):
        """The compiled grammar (xgrammar CompiledGrammar); RequestError naming so.param
        when the spec is not one xgrammar can compile."""
        key = (so.kind, so.spec)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiler = self._get_compiler()
        try:
            compiled = _compile(compiler, so)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with the reason
            raise RequestError(f"invalid {so.param}: {compile_error_reason(e)}", so.param) from e
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return compiled

    def state(self, so: StructuredOutput) -> "GrammarState":
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(so)))

    def __len__(self) -> int:
        return len(self._compiled)


_LENIENT_CHAR, _JSON_CHAR = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'


def _compile(compiler, so: StructuredOutput):
    import json

    if so.kind == "json_object":
        # An object, not any JSON value (vLLM's reading of OpenAI's json_object).
        return compiler.compile_json_schema('{"type":"object"}', any_whitespace=False)
    if so.kind == "json_schema":
        import xgrammar as xgr

        # any_whitespace=False: compact JSON (one space after ':' and ','), as vLLM does
        # with --structured-outputs-config.disable_any_whitespace; a small model left free
        # to write whitespace can fill max_tokens with newlines.
        grammar = xgr.Grammar.from_json_schema(so.spec, any_whitespace=False, strict_mode=True)
        # NOTE: xgrammar 0.2.8 writes a string with minLength/maxLength as characters
        # [^"\\\r\n], which lets raw control characters through (invalid JSON: a parser
        # refuses them); its other strings exclude \0-\x1f, as JSON requires.
        return compiler.compile_grammar(str(grammar).replace(_LENIENT_CHAR, _JSON_CHAR))
    if so.kind == "regex":
        return compiler.compile_regex(so.spec)
    if so.kind == "choice":
        # JSON string escapes are valid in xgrammar's EBNF string literals.
        options = " | ".join(json.dumps(o, ensure_ascii=False) for o in json.loads(so.spec))
        return compiler.compile_grammar(f"root ::= {options}")
    return compiler.compile_grammar(so.spec)


class GrammarState:
    """One request's matcher. NOTE: num_accepted counts the request's output tokens the
    matcher has consumed; output tokens never change, so catching up is exact."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.num_accepted = 0

    def catch_up(self, request) -> str | None:
        """Feed the request's output tokens not yet accepted; a reason when one breaks
        the grammar (the request then fails: its output can no longer be valid)."""
        p = request.params
        start = max(request.num_prompt_tokens - p.resumed_output_tokens, 0)
        tokens = request.all_token_ids
        while start + self.num_accepted < len(tokens):
            token = tokens[start + self.num_accepted]
            if not self.matcher.accept_token(token):
                return (f"output token {token} at position {self.num_accepted} breaks the "
                        f"requested {p.structured.kind} structure")
            self.num_accepted += 1
        if self.matcher.is_terminated():
            return f"the {p.structured.kind} structure is complete but the request did not stop"
        return None


def mask_rows(logits: torch.Tensor, requests: list) -> dict[int, str]:
    """logits: [N, V] float32, modified in place: for every row whose request has a
    grammar (request.grammar), the tokens the grammar forbids get -inf. Returns row ->
    reason for the rows that cannot go on (their output broke the grammar)."""
    import xgrammar as xgr

    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    refused: dict[int, str] = {}
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i in rows:
        state: GrammarState = requests[i].grammar
        why = state.catch_up(requests[i])
        if why is not None:
            refused[i] = why
            continue
        state.matcher.fill_next_token_bitmask(bitmask, i)
    masked = [i for i in rows if i not in refused]
    if masked:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1],
                                        indices=masked)
    return refused
