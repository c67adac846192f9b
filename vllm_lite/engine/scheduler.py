"""Continuous batching. Every step is one decision ``{sequence: number of new tokens}`` under a
token budget: running sequences first (a decode token, or the next chunk of a long prompt),
then waiting prompts, chunked to fit. A prompt whose leading blocks are in the prefix cache
starts after them: only its uncached suffix counts against the budget. When the KV pool runs
dry the most recently admitted running sequence is preempted: its blocks are freed (keeping
their cached prefix) and it is recomputed later. The engine adds the forked completions of an
``n > 1`` request to ``running`` itself (``add_forked``)."""

from __future__ import annotations

from collections import deque

from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.sequence import Sequence, SequenceStatus
from vllm_lite.worker.batch import ScheduledBatch


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        # prefix-cache hit rate, in prompt tokens of first admissions (vLLM's counters)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seq: Sequence) -> None:
        """A completion forked from a running sequence: it runs at once, its seat was kept."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes: list[tuple[Sequence, int]] = []  # (sequence, new tokens): one-token steps go first
        chunks: list[tuple[Sequence, int]] = []

        i, block_size = 0, self.block_manager.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.at_length_limit(
                len(seq.token_ids), self.max_model_len
            ):  # its last token, in flight, ends it
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget, seq.max_chunk_tokens)
            needed = seq.num_computed_tokens + n
            if (
                needed > len(seq.block_table) * block_size
            ):  # a new block (decode: every block_size steps)
                if not self._make_room(seq, needed):
                    continue
                self.block_manager.allocate(seq, needed)
            (decodes if n == 1 else chunks).append((seq, n))
            budget -= n
            i += 1

        seats = 0  # taken of max_num_seqs: a request of n completions takes n, forked or not
        if self.waiting:
            seats = len(self.running) + sum(s.num_seats - 1 for s in self.running if s.params.n > 1)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seats + seq.num_seats > self.max_num_seqs:
                break
            use_cache = self._may_use_prefix_cache(seq)
            cached = self.block_manager.find_cached_prefix(seq) if use_cache else []
            num_cached = len(cached) * block_size
            n = min(len(seq) - num_cached, budget, seq.max_chunk_tokens)
            if not self.block_manager.can_allocate(seq, num_cached + n, cached):
                break
            seats += seq.num_seats
            if cached:
                self.block_manager.share(seq, cached)
                seq.num_computed_tokens = num_cached
            self.block_manager.allocate(seq, num_cached + n)
            if seq.num_preemptions == 0:  # first admission
                seq.num_cached_tokens = num_cached
                if use_cache:
                    self.prefix_cache_queries += len(seq)
                    self.prefix_cache_hits += num_cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (decodes if n == 1 else chunks).append((seq, n))
            budget -= n

        work = decodes + chunks
        return ScheduledBatch([s for s, _ in work], [n for _, n in work])

    def _may_use_prefix_cache(self, seq: Sequence) -> bool:
        """Not while its prompt is still to be scored: prompt_logprobs need every prompt token's
        logits (vLLM skips the cache for such requests too)."""
        return self.block_manager.enable_prefix_caching and (
            seq.prompt_logprobs is None or len(seq.prompt_logprobs) == seq.num_prompt_tokens
        )

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt from the back of ``running`` until ``seq`` can hold ``num_tokens`` tokens.
        Returns False if ``seq`` itself had to be preempted."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and give its blocks back at once."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
