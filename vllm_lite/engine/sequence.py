"""One request as the engine sees it: its tokens, how many of them are in the KV cache, and the
physical blocks that hold them."""
from __future__ import annotations

import enum
import itertools

from vllm_lite.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 prompt: str | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator = None  # per-request torch.Generator for seeded sampling
        self.detok = None  # incremental detokenizer; None when the request wants token ids only
        self.num_preemptions = 0
        self.inflight_index = -1  # row of its token in the step in flight (overlapped steps)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def at_length_limit(self, num_tokens: int, max_model_len: int | None) -> bool:
        """Whether its first ``num_tokens`` tokens reach ``max_tokens`` or ``max_model_len``."""
        max_tokens = self.params.max_tokens
        return ((max_tokens is not None and num_tokens - self.num_prompt_tokens >= max_tokens)
                or (max_model_len is not None and num_tokens >= max_model_len))

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
