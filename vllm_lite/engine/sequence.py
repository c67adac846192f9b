"""One completion as the engine sees it: its tokens, how many of them are in the KV cache, and
the physical blocks that hold them. A request is one Sequence, or n of them (``params.n``): the
first is scheduled alone and, once its prompt is computed, forks the others (``fork``)."""

from __future__ import annotations

import enum
import itertools

from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.batch import PLACEHOLDER  # noqa: F401  (the engine's name for it too)
from vllm_lite.worker.logprobs import FlatLogprobs

_ids = itertools.count()
MAX_CHUNK = 1 << 62


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_FINISHED = SequenceStatus.FINISHED  # a member read through its class costs ~0.1 us on Python 3.11


class Sequence:
    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.num_cached_blocks = 0  # leading blocks of block_table the prefix cache has keyed
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache when first scheduled
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator = None  # per-request torch.Generator for seeded sampling
        self.grammar = None  # xgrammar GrammarMatcher of its structured output, advanced per token
        self.num_preemptions = 0
        self.num_reported = 0  # output tokens handed to the output processor
        self.inflight_index = -1  # row of its token in the step in flight (overlapped steps)
        self.max_chunk_tokens = (
            MAX_CHUNK  # tokens one step may compute for it (prompt_logprobs: fewer)
        )
        self.index = 0  # which of the request's n completions
        self.group: list[Sequence] = [
            self
        ]  # the request's completions, in index order (shared list)
        # per prompt token {token id: Logprob} (None for the first), when params.prompt_logprobs
        # is set (shared by the group; texts are the output processor's)
        self.prompt_logprobs: FlatLogprobs | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = FlatLogprobs()
            self.prompt_logprobs.append_none()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def at_length_limit(self, num_tokens: int, max_model_len: int | None) -> bool:
        """Whether its first ``num_tokens`` tokens reach ``max_tokens`` or ``max_model_len``."""
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and num_tokens - self.num_prompt_tokens >= max_tokens) or (
            max_model_len is not None and num_tokens >= max_model_len
        )

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    @property
    def num_seats(self) -> int:
        """Places among ``max_num_seqs`` it takes: a request's first sequence keeps a place for
        each completion it has yet to fork."""
        return self.params.n - len(self.group) + 1 if self.index == 0 else 1

    @property
    def needs_fork(self) -> bool:
        return len(self.group) < self.params.n

    def fork(self) -> Sequence:
        """The request's next completion: same prompt, no output yet, KV blocks to be given by
        the block manager (``BlockManager.share`` of the prompt's full blocks)."""
        child = Sequence(self.prompt_token_ids, self.params, self.request_id, self.prompt)
        child.index = len(self.group)
        child.group = self.group
        child.prompt_logprobs = self.prompt_logprobs
        self.group.append(child)
        return child
