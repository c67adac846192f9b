"""Batched sampling with vLLM's parameters, all on the logits' device: one host round trip per
step (the sampled ids), none per sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


class Sampler:
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, default_generator=None) -> torch.Tensor:
        logits = logits.float()
        for row, token_ids in batch.banned:
            logits[row, token_ids] = float("-inf")
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        if batch.any_min_p:
            threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        if batch.any_top_k_top_p:
            probs = _top_k_top_p(probs, batch.top_k, batch.top_p)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (Gumbel-max in disguise).
        noise = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(batch.generators) if g is not None]
        if len(seeded) < len(batch.generators):
            noise.exponential_(generator=default_generator)
        for i in seeded:
            noise[i].exponential_(generator=batch.generators[i])
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.temperature > 0, sampled, greedy)


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
