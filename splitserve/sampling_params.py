"""The one definition of a request's sampling parameters.

Every process boundary carries this struct as it is, with msgspec's JSON codec: the
frontend builds it from the OpenAI body, a worker's /generate takes it, the decode worker
sends it to the prefill worker inside the KV protocol's PREFILL (P samples the first
token, so it needs every control that shapes that token), and a migrated request is
re-sent with it. It is a leaf module: the engine, the transfer protocol and the worker
protocol import it, and it imports none of them.
"""

from __future__ import annotations

import msgspec

from splitserve.structured_output import StructuredOutput

# vLLM's _SAMPLING_EPS: a temperature below it is greedy. Dividing logits by a smaller one
# overflows float32 (1e-40 turns every logit into +-inf and the probabilities into NaN).
SAMPLING_EPS = 1e-5
# Above this every token is equally likely anyway; the KV protocol's frames carry no more.
MAX_TEMPERATURE = 1e6
# Token ids are below 2**31 in every vocabulary (and fit the KV protocol's bound); the
# engine checks the model's own vocabulary size on top of this.
MAX_TOKEN_ID = 2**31 - 1
MAX_STOP_TOKEN_IDS = 1024
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1   # torch.Generator's range (vLLM's bounds too)
MAX_LOGPROBS = 20   # vLLM's default --max-logprobs; OpenAI's top_logprobs bound too
MAX_LOGIT_BIAS_ENTRIES = 1024


class SamplingError(ValueError):
    """A sampling parameter is invalid; the message names the parameter."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Per-request sampling. A temperature below SAMPLING_EPS (0 included) means greedy;
    top_k <= 0 disables top-k.

    Every field is type- and range-checked here, whatever built the object (the HTTP
    front, a worker's /generate body, a KV frame): a value that passes can never make the
    engine raise for this request (no NaN, no unhashable stop ids, no seed torch refuses).
    msgspec runs __post_init__ on decode too, so a frame can carry no value that the
    constructor would refuse; the msgspec.ValidationError it raises then has the
    SamplingError (with its `param`) as __cause__."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs. k >= 0: the sampled token's logprob and the k most likely
    # tokens' (chat top_logprobs, completions logprobs).
    logprobs: int | None = None
    # As vLLM defines them (engine/logits_processors.py applies them): presence and
    # frequency penalise tokens already generated, repetition every token of prompt and
    # output; logit_bias adds to chosen tokens' logits; before min_tokens tokens are out,
    # EOS and stop_token_ids cannot be sampled.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    # The last this-many prompt tokens are output an earlier worker generated (a migrated
    # request is re-sent as prompt + output so far): penalties count them as output.
    resumed_output_tokens: int = 0
    # What the output must look like (structured_output.py): every engine that samples a
    # token of this request (P's first, D's, a migration's next D) masks it with the
    # grammar, which it rebuilds from the output so far (engine/grammar.py).
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens!r}", "max_tokens")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got "
                                f"{self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOKEN_ID:
            raise SamplingError(f"top_k must be -1, 0 (disabled) or positive (at most "
                                f"{MAX_TOKEN_ID}), got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise SamplingError(f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}", "seed")
        if not isinstance(self.stop_token_ids, tuple) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} "
                                "token ids", "stop_token_ids")
        bad = next((t for t in self.stop_token_ids if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID), None)
        if bad is not None:
            raise SamplingError(f"stop_token_ids must hold token ids in [0, {MAX_TOKEN_ID}], got "
                                f"{bad!r}", "stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", "ignore_eos")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}", name)
        # vLLM: greater than zero; bounded here only to keep out infinities.
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= MAX_TEMPERATURE:
            raise SamplingError(f"repetition_penalty must be greater than 0 (at most "
                                f"{MAX_TEMPERATURE:g}), got {self.repetition_penalty!r}",
                                "repetition_penalty")
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise SamplingError(f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids "
                                "to biases", "logit_bias")
        for entry in self.logit_bias:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not _is_int(entry[0])
                    or not 0 <= entry[0] <= MAX_TOKEN_ID or not _is_number(entry[1])
                    or not -100.0 <= entry[1] <= 100.0):
                raise SamplingError(f"logit_bias maps token ids in [0, {MAX_TOKEN_ID}] to "
                                    f"numbers in [-100, 100], got {entry!r}", "logit_bias")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                                f"{self.min_tokens!r}", "min_tokens")
        if not _is_int(self.resumed_output_tokens) or not 0 <= self.resumed_output_tokens <= MAX_TOKEN_ID:
            raise SamplingError(f"resumed_output_tokens must be a non-negative integer, got "
                                f"{self.resumed_output_tokens!r}", "resumed_output_tokens")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise SamplingError(f"structured must be a StructuredOutput, got {self.structured!r}",
                                "response_format")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                                f"{self.logprobs!r}", "logprobs")

    def for_first_token(self) -> "SamplingParams":
        """What a prefill worker samples the first token with: one token, and of
        min_tokens only whether that first one may be EOS."""
        return msgspec.structs.replace(self, max_tokens=1, min_tokens=min(self.min_tokens, 1))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def processes_logits(self) -> bool:
        """True when a penalty, a bias or min_tokens changes this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)
