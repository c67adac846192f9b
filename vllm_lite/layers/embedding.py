"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_lite.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype=None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + tp_size() - 1) // tp_size()
        self.vocab_start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(
            torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False
        )

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        end = min(self.vocab_start + self.shard_size, self.vocab_size)
        part = torch.as_tensor(loaded[self.vocab_start : end])
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(
            self.weight.dtype
        )
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the full vocabulary: each rank computes its slice, then they are gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return all_gather_last_dim(logits)[..., : self.vocab_size]
