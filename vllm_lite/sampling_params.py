"""Sampling parameters with vLLM's names and meanings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vllm_lite.structured_output import StructuredOutputsParams


@dataclass
class SamplingParams:
    """What to sample and when to stop, as vLLM's ``SamplingParams``.

    Logit processing runs in vLLM's order on each row's logits: ``allowed_token_ids`` (every
    other token masked), ``min_tokens`` (EOS and stop tokens masked), ``logit_bias`` (added),
    ``repetition_penalty`` (prompt and output tokens: a positive logit divided by it, a negative
    one multiplied, as transformers' ``RepetitionPenaltyLogitsProcessor``), then
    ``frequency_penalty`` and ``presence_penalty`` (output tokens only, OpenAI's formula
    ``logit - frequency_penalty * count - presence_penalty * (count > 0)``); then temperature,
    min_p, top-k/top-p and the draw.

    ``logprobs`` / ``prompt_logprobs`` are vLLM's default ``logprobs_mode="raw_logprobs"``: the
    log-softmax of the model's own logits, before any of the processing above (penalties, bias,
    allowed ids, temperature, top-k/top-p do not change them). Each output token gets a dict of
    the sampled token and the ``logprobs`` most likely ones, ``{token_id: Logprob(logprob, rank,
    decoded_token)}``; rank 1 is the most likely token.

    ``n`` completions of one prompt share the prompt's KV blocks; with a ``seed``, completion
    ``i`` draws from its own generator seeded ``seed + i`` (vLLM's rule), so the n outputs are
    reproducible and differ from each other.

    ``structured_outputs`` (``StructuredOutputsParams``; vLLM's older ``guided_decoding`` is
    taken as the same) holds the output to a JSON schema, regex, choice or grammar: the
    grammar's mask comes first, before everything above, and logprobs are read after it (as in
    vLLM, whose runner masks the logits before its sampler sees them).
    """

    n: int = 1  # completions per prompt
    presence_penalty: float = 0.0  # [-2, 2], output tokens: minus this once a token has appeared
    frequency_penalty: float = 0.0  # [-2, 2], output tokens: minus this times its count
    repetition_penalty: float = 1.0  # > 0, 1 = off; prompt and output tokens
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token)
    seed: int | None = None  # per-request generator: same seed, same output, whatever the batch
    stop: list[str] | str | None = None  # the text ends before the first stop string
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # EOS and stop tokens are ignored until this many tokens exist
    logprobs: int | None = None  # k: each output token's logprob and the k most likely ones
    prompt_logprobs: int | None = None  # k: the same for every prompt token but the first
    detokenize: bool = True  # False: token ids only (text stays empty; stop strings unavailable)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = (
        None  # {token id: bias added to its logit}, bias in [-100, 100]
    )
    allowed_token_ids: list[int] | None = None  # only these tokens can be sampled
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, grammar
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name of the same
    _stop: list[str] = field(init=False, repr=False)
    # set by validate(): any of penalties, bias, allowed ids, logprobs (the sampler's extra work)
    needs_extras: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        self._stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.logit_bias, dict):  # JSON gives string keys; vLLM takes them too
            try:
                self.logit_bias = {int(t): b for t, b in self.logit_bias.items()}
            except (TypeError, ValueError):
                pass  # validate() names the field
        if self.allowed_token_ids is not None and not isinstance(
            self.allowed_token_ids, (str, bytes)
        ):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.guided_decoding is not None and self.structured_outputs is None:
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an int >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_number(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if not self.temperature >= 0.0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (disabled), 0 (disabled) or a positive int")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            bad("max_tokens", "must be an int >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an int or None")
        if any(not isinstance(s, str) or not s for s in self._stop):
            bad("stop", "must be non-empty strings")
        if self._stop and not self.detokenize:
            bad("stop", "needs detokenize=True")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative ints")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or k < 0):
                bad(name, "must be None or an int >= 0 (the number of most likely tokens returned)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                not is_int(t) or t < 0 for t in self.logit_bias
            ):
                bad("logit_bias", "must be a dict {token id (int >= 0): bias}")
            if any(not is_number(b) or not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
                bad("logit_bias", "biases must be numbers in [-100, 100]")
        if self.allowed_token_ids is not None:
            if (
                not isinstance(self.allowed_token_ids, list)
                or not self.allowed_token_ids
                or any(not is_int(t) or t < 0 for t in self.allowed_token_ids)
            ):
                bad(
                    "allowed_token_ids", "must be None or a non-empty list of token ids (ints >= 0)"
                )
        if self.guided_decoding is not None:
            bad("guided_decoding", "is the old name of structured_outputs: give one of them")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                bad("structured_outputs", "must be a StructuredOutputsParams")
            self.structured_outputs.validate()
        self.needs_extras = (
            self.has_penalties
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or self.logprobs is not None
        )
