"""Log-probabilities as vLLM returns them: per position ``{token id: Logprob}``, the chosen token
first, then the top-k (ranks 1..k); and how they are computed from a step's logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, k: int):
    """For the logits rows ``rows`` [L] and one token per row: the token's log-probability [L]
    (``log_softmax`` in fp32), its rank [L] (vLLM's: the number of tokens at least as likely, so
    the top token has rank 1), and the k most likely tokens' logprobs and ids [L, k] (k is
    capped at the vocabulary). On CUDA one fused Triton pass over the rows (``fused_ops``)."""
    k = min(k, logits.shape[1])
    if logits.is_cuda:
        from vllm_lite.layers.fused_ops import token_logprobs as fused

        return fused(logits, rows, tokens, k)
    return token_logprobs_native(logits, rows, tokens, k)


def token_logprobs_native(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, k: int):
    """The plain PyTorch version (the CPU path, and the reference for the fused kernel)."""
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    token_lp = logprobs.gather(1, tokens[:, None].long())
    rank = (logprobs >= token_lp).sum(dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    return token_lp[:, 0], rank, top_lp, top_ids


@dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank among all tokens (1 = most likely) and its
    text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FlatLogprobs(Sequence):
    """A sequence's per-position ``{token id: Logprob}``, stored flat (a few lists of numbers and
    strings) and built into dicts only when read, as vLLM's ``FlatLogprobs``. A dict and k + 1
    ``Logprob`` objects per token, kept for every running sequence, are millions of small
    objects whose scans by Python's garbage collector cost more than the rest of a step."""

    def __init__(self) -> None:
        self.ends: list[int] = []  # position i's entries are [ends[i - 1], ends[i]); none: None
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ranks: list[int] = []
        self.texts: list[str | None] = []

    def append(
        self,
        token_id: int,
        logprob: float,
        rank: int,
        top_ids: list[int],
        top_logprobs: list[float],
        texts: list[str | None],
    ) -> None:
        """One position: the chosen token, then the top tokens; ``texts`` of all of them."""
        self.token_ids.append(token_id)
        self.token_ids += top_ids
        self.logprobs.append(logprob)
        self.logprobs += top_logprobs
        self.ranks.append(rank)
        self.ranks += range(1, len(top_ids) + 1)
        self.texts += texts
        self.ends.append(len(self.token_ids))

    def append_none(self) -> None:
        """A position without logprobs (a prompt's first token)."""
        self.ends.append(len(self.token_ids))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("position out of range")
        start, end = self.ends[i - 1] if i else 0, self.ends[i]
        if start == end:
            return None
        return {
            self.token_ids[j]: Logprob(self.logprobs[j], self.ranks[j], self.texts[j])
            for j in range(start, end)
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))
