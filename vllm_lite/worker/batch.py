"""What the worker gets from the engine for one step: the scheduled sequences, each read only
through the few fields of ``StepSequence`` (the engine's ``Sequence`` has them), and the
per-step arrays' rows kept for each sequence. The worker defines these, so that it never
imports the engine above it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PLACEHOLDER = -1  # a sampled token not yet read back from the device


class StepSequence(Protocol):
    """A scheduled sequence as the model runner and sampler read it."""

    seq_id: int
    token_ids: list[int]  # prompt then output; the last may be PLACEHOLDER (in flight)
    num_computed_tokens: int  # tokens whose K/V are in the cache
    block_table: list[int]  # physical KV blocks, in order
    inflight_index: int  # row of its token in the step in flight (overlapped steps)


@dataclass
class ScheduledBatch:
    """The step's work, decodes (one new token) first, then prefill chunks."""

    seqs: list[StepSequence]
    num_new_tokens: list[int]

    @property
    def num_decodes(self) -> int:
        return self.num_new_tokens.count(1)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class SequenceRows:
    """Which row of an array kept between steps (block tables, penalties' token ids) holds each
    sequence's data. A sequence keeps its row from step to step; the rows of sequences that
    left the steps (finished, preempted) are given to others only when free rows run short,
    and then the rows at least double."""

    def __init__(self, num_rows: int = 0) -> None:
        self.num_rows = num_rows
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free = list(range(num_rows - 1, -1, -1))

    def assign(self, seqs: list[StepSequence]) -> tuple[list[int], list[int]]:
        """The row of each of ``seqs``, and the rows this call gave to sequences new here
        (their old contents are another sequence's: the caller resets them)."""
        new = [s for s in seqs if s.seq_id not in self.row_of]
        if len(new) > len(self.free):
            keep = {s.seq_id for s in seqs}
            self.free += [self.row_of.pop(i) for i in [i for i in self.row_of if i not in keep]]
        if len(new) > len(self.free):
            extra = max(len(new) - len(self.free), self.num_rows)
            self.free += range(self.num_rows + extra - 1, self.num_rows - 1, -1)
            self.num_rows += extra
        given = [self.free.pop() for _ in new]
        for seq, row in zip(new, given):
            self.row_of[seq.seq_id] = row
        return [self.row_of[s.seq_id] for s in seqs], given
