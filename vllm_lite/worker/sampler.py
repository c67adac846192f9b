"""Batched sampling with vLLM's parameters, all on the logits' device: one host round trip per
step (the sampled ids, and the logprobs where asked), none per sequence. Per-row extras
(penalties, logit bias, allowed tokens, logprobs) arrive as small index tensors, which the
engine builds once per batch of sequences (penalties also read the sequences' token ids, kept
on the device by ``TokenHistory``); a batch that uses none of them pays nothing for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_lite.structured_output import apply_bitmask
from vllm_lite.worker.batch import PLACEHOLDER, SequenceRows
from vllm_lite.worker.logprobs import token_logprobs


@dataclass
class Penalties:
    """Repetition, frequency and presence penalties of the rows that have any (``rows``), and
    those rows' token ids: ``tokens[i, :lengths[i]]`` is row i's sequence, its first
    ``prompt_lens[i]`` the prompt (``TokenHistory`` keeps them on the device)."""

    rows: torch.Tensor | None  # [P] rows of the batch; None: all of them
    repetition: torch.Tensor  # [P] float, 1 = off
    frequency: torch.Tensor  # [P] float
    presence: torch.Tensor  # [P] float
    any_repetition: bool
    prompt_lens: torch.Tensor  # [P]
    tokens: torch.Tensor | None = None  # [P, W] int32, set every step
    lengths: torch.Tensor | None = None  # [P], set every step


class TokenHistory:
    """The token ids (prompt, then output) of penalized sequences as rows of one device array
    kept between steps, where the penalties count them. A step writes only what its sequences
    gained since their last step; in a decode that is the token of the step in flight, which
    the host does not know yet: it is copied on the device from that step's sampled tokens."""

    def __init__(self, device: torch.device, to_device) -> None:
        self.to_device = to_device  # (host values, dtype) -> device tensor
        self.slots = SequenceRows()
        self.tokens = torch.zeros((0, 0), dtype=torch.int32, device=device)  # grows as needed
        self.written: list[int] = []  # per row: leading positions written
        self.row_list: list[int] = []  # the batch's rows, from assign()
        self.rows: torch.Tensor | None = None  # the same on the device

    def assign(self, seqs: list) -> None:
        """Rows for a new batch of penalized sequences: kept for those already here."""
        self.row_list, given = self.slots.assign(seqs)
        self.written += [0] * (self.slots.num_rows - len(self.written))
        for row in given:
            self.written[row] = 0
        self._grow(self.slots.num_rows, self.tokens.shape[1])
        self.rows = self.to_device(self.row_list, torch.int64)

    def update(
        self, seqs: list, prev_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write what ``seqs`` (as in ``assign``) gained; their ``[P, longest]`` tokens and
        lengths. ``prev_tokens``: the in-flight step's sampled tokens (``seq.inflight_index``)."""
        lengths = [len(seq.token_ids) for seq in seqs]
        self._grow(len(self.tokens), max(lengths))
        width = self.tokens.shape[1]
        known_at, known, flight_at, flight_from = [], [], [], []  # flat positions in self.tokens
        for seq, n, row in zip(seqs, lengths, self.row_list):
            ids, done, start = seq.token_ids, self.written[row], row * width
            end = n - 1 if ids[-1] == PLACEHOLDER else n  # the host knows ids[:end]
            if done < end:
                known_at.extend(range(start + done, start + end))
                known.extend(ids[done:end])
            if end < n and done <= end:
                flight_at.append(start + end)
                flight_from.append(seq.inflight_index)
            self.written[row] = n
        flat, to_device = self.tokens.view(-1), self.to_device
        if known:
            flat[to_device(known_at, torch.int64)] = to_device(known, torch.int32)
        if flight_at:
            flat[to_device(flight_at, torch.int64)] = prev_tokens[
                to_device(flight_from, torch.int64)
            ].to(torch.int32)
        return self.tokens[self.rows, : max(lengths)], to_device(lengths, torch.int64)

    def _grow(self, rows: int, width: int) -> None:
        """At least ``rows`` x ``width``, at least doubling a dimension that grows."""
        old = self.tokens
        if rows <= old.shape[0] and width <= old.shape[1]:
            return
        shape = (
            max(rows, 2 * old.shape[0]) if rows > old.shape[0] else old.shape[0],
            max(width, 2 * old.shape[1]) if width > old.shape[1] else old.shape[1],
        )
        self.tokens = torch.zeros(shape, dtype=torch.int32, device=old.device)
        self.tokens[: old.shape[0], : old.shape[1]] = old


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors."""

    temperature: torch.Tensor  # [B] float, 0 = greedy
    top_k: torch.Tensor  # [B] int, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    generators: list  # [B] torch.Generator or None (seeded rows)
    banned: list[tuple[int, list[int]]]  # (row, token ids) masked out (min_tokens)
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    # allowed_token_ids: (rows that have a list [A], (index into rows, token id) of each allowed
    # token)
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (row, token, bias)
    penalties: Penalties | None = None
    logprob_rows: torch.Tensor | None = None  # rows that want logprobs
    num_logprobs: int = 0  # the most top logprobs any of those rows wants
    any_greedy: bool = (
        True  # False: no row is greedy, so no argmax of the processed logits is needed
    )
    # structured outputs: (bitmask [B, vocab / 32] of the tokens the grammars allow, the rows
    # that have a grammar: a list, on CUDA a device tensor, None: all); set every step
    # (``StructuredOutputManager.bitmask``)
    grammar: tuple[torch.Tensor, list[int] | torch.Tensor | None] | None = None

    @property
    def changes_logits(self) -> bool:
        """Whether ``Sampler.process_logits`` has anything to do."""
        return (
            self.allowed is not None
            or bool(self.banned)
            or self.logit_bias is not None
            or self.penalties is not None
        )


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] sampled token ids
    # for the ``logprob_rows``, from the raw logits (``token_logprobs``): the sampled token's
    # logprob [L] and rank [L], the ``num_logprobs`` most likely tokens' logprobs and ids [L, k]
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Sampler:
    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, default_generator=None
    ) -> torch.Tensor:
        return self.sample(logits, batch, default_generator).tokens

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, batch: SamplingBatch, default_generator=None
    ) -> SamplerOutput:
        rows, processed = batch.logprob_rows, logits
        if batch.grammar is not None:  # first, and before logprobs are read (as in vLLM)
            apply_bitmask(logits, *batch.grammar)
        if batch.changes_logits:
            # logprobs are vLLM's "raw_logprobs", from the logits before any processing, which
            # writes in place: into a copy where .float() makes none
            processed = (
                logits.clone()
                if rows is not None and logits.dtype == torch.float32
                else logits.float()
            )
            processed = self.process_logits(processed, batch)
        tokens = self._draw(processed, batch, default_generator)
        if rows is None:
            return SamplerOutput(tokens)
        return SamplerOutput(tokens, token_logprobs(logits, rows, tokens[rows], batch.num_logprobs))

    @staticmethod
    def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """vLLM's order: allowed token ids, min_tokens bans, logit bias, then penalties
        (repetition, frequency, presence). Writes into ``logits``."""
        if batch.allowed is not None:
            rows, keep_rows, keep_tokens = batch.allowed
            mask = torch.ones((len(rows), logits.shape[1]), dtype=torch.bool, device=logits.device)
            mask[keep_rows, keep_tokens] = False
            logits[rows] = logits[rows].masked_fill(mask, float("-inf"))
        for row, token_ids in batch.banned:
            logits[row, token_ids] = float("-inf")
        if batch.logit_bias is not None:
            rows, tokens, bias = batch.logit_bias
            logits.index_put_((rows, tokens), bias, accumulate=True)
        if batch.penalties is not None:
            # on the rows' token lists ([P, longest], small), never a pass over [P, vocab]
            p = batch.penalties
            sub = logits if p.rows is None else logits[p.rows]
            ids, pos = p.tokens.long(), torch.arange(p.tokens.shape[1], device=logits.device)
            inside = pos < p.lengths[:, None]  # the row's tokens; later columns hold stale ids
            output = inside & (pos >= p.prompt_lens[:, None])
            if p.any_repetition:  # each seen token once: a repeated id writes the same value again
                seen = torch.where(inside, ids, ids[:, :1])  # (a row's first token is inside)
                score, penalty = sub.gather(1, seen), p.repetition[:, None]
                sub.scatter_(1, seen, torch.where(score > 0, score / penalty, score * penalty))
            # frequency: once per output token; presence: once per distinct output token
            sub.scatter_add_(1, ids, -p.frequency[:, None] * output)
            distinct = torch.where(output, ids, -1).sort(dim=1).values
            first = torch.ones_like(output)
            first[:, 1:] = distinct[:, 1:] != distinct[:, :-1]
            sub.scatter_add_(
                1, distinct.clamp(min=0), -p.presence[:, None] * (first & (distinct >= 0))
            )
            if p.rows is not None:
                logits[p.rows] = sub
        return logits

    @staticmethod
    def _draw(
        logits: torch.Tensor, batch: SamplingBatch, default_generator, fused: bool | None = None
    ) -> torch.Tensor:
        """The sampled token of every row; ``fused``: the Triton path (default: on CUDA)."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        if logits.is_cuda if fused is None else fused:
            # one Triton pass: Gumbel-max (the race below, its noise drawn in the kernel from a
            # per-row seed), argmax for greedy rows. Top-k/top-p/min-p rows first lose the
            # tokens those filters drop; other rows are left exactly as they are, so a seeded
            # request draws the same tokens whatever else is in the batch
            from vllm_lite.layers.fused_ops import gumbel_sample

            if batch.any_min_p or batch.any_top_k_top_p:
                kept = (
                    _filter(torch.softmax(logits.float() / temperature[:, None], dim=-1), batch) > 0
                )
                filtered = (batch.top_k > 0) | (batch.top_p < 1.0) | (batch.min_p > 0)
                logits = logits.masked_fill(~kept & filtered[:, None], float("-inf"))
            return gumbel_sample(
                logits,
                batch.temperature,
                _row_seeds(batch.generators, default_generator, logits.device),
            )
        probs = _filter(torch.softmax(logits / temperature[:, None], dim=-1), batch)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (Gumbel-max in disguise).
        noise = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(batch.generators) if g is not None]
        if len(seeded) < len(batch.generators):
            noise.exponential_(generator=default_generator)
        for i in seeded:
            noise[i].exponential_(generator=batch.generators[i])
        sampled = (probs / noise).argmax(dim=-1)
        if not batch.any_greedy:  # one pass over [rows, vocab] less
            return sampled
        return torch.where(batch.temperature > 0, sampled, logits.argmax(dim=-1))


def _filter(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """min-p, then top-k and top-p: the probabilities of the tokens they drop set to 0."""
    if batch.any_min_p:
        threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if batch.any_top_k_top_p:
        probs = _top_k_top_p(probs, batch.top_k, batch.top_p)
    return probs


def _row_seeds(generators: list, default_generator, device: torch.device) -> torch.Tensor:
    """[B] int64 Philox keys: from the engine's generator, and a seeded row's own generator
    (one draw each per step, so a seeded request's stream does not depend on the batch)."""
    seeds = torch.randint(1 << 62, (len(generators),), generator=default_generator, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            seeds[i] = torch.randint(1 << 62, (1,), generator=g, device=device)[0]
    return seeds


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    sorted_probs = sorted_probs.masked_fill(rank >= k, 0.0)
    # top-p over what top-k kept: keep a token if the mass before it is still below top_p
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    total = sorted_probs.sum(dim=-1, keepdim=True)
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None] * total, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
