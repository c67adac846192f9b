"""The engine's brain (the seed's executor): the request queue, one scheduling + model step at a
time, sampling (with logprobs, and the fork of a request's n completions), stop checks,
incremental detokenization, and reclaiming finished sequences."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from vllm_lite.config import EngineConfig
from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.detokenizer import IncrementalDetokenizer
from vllm_lite.engine.scheduler import Scheduler
from vllm_lite.engine.sequence import MAX_CHUNK, PLACEHOLDER, Sequence
from vllm_lite.worker.logprobs import FlatLogprobs, token_logprobs
from vllm_lite.worker.sampler import Penalties, Sampler, SamplingBatch, TokenHistory
from vllm_lite.sampling_params import SamplingParams


# Prompt chunks of a request that wants prompt_logprobs: the logits of every row are kept, so a
# chunk is capped (512 rows x a 150k vocabulary is 150 MB in bf16, not 2.5 GB for 8192 rows).
PROMPT_LOGPROBS_CHUNK = 512


class _InFlight:
    """A launched step: which sequences sample, where their token goes, the device tokens, and
    the sampled tokens' logprobs for the rows that asked (``logprob_rows[i]``: row of sequence i
    in those tensors, -1 if none)."""

    def __init__(self, seqs: list[Sequence], positions: list[int], tokens: torch.Tensor,
                 logprobs: tuple | None = None, logprob_rows: list[int] | None = None) -> None:
        self.seqs, self.positions, self.tokens, self.logprob_rows = seqs, positions, tokens, logprob_rows
        tensors = [tokens, *(logprobs or ())]
        if tokens.is_cuda:  # start the copies back now; host_tokens() waits only for them
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors):
                host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tensors, None

    def host_tokens(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0].tolist()

    def host_logprobs(self) -> list[list] | None:
        """(token logprob, rank, top logprobs, top ids) as lists; call after host_tokens()."""
        return [t.tolist() for t in self._host[1:]] if len(self._host) > 1 else None


@dataclass
class _ParamsBatch:
    """What a sampling batch takes from its requests' parameters alone: built once for a batch
    and kept while its rows are the same sequences (``seq_ids``)."""
    seq_ids: list[int]
    batch: SamplingBatch  # no min_tokens bans; penalties, if any, without their step's tokens
    min_tokens_rows: list[tuple[int, list[int]]]  # rows with min_tokens > 0, and their stop ids
    penalized: list[int]  # rows with penalties


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs, when logprobs were asked
    logprobs: FlatLogprobs | None = None  # per token {token id: Logprob}: the sampled and the top-k tokens
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: FlatLogprobs | None = None  # the same per prompt token, None for the first
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the engine's fixed shape. A server's front end, which
    runs in another process than the engine, checks requests with a copy before queueing them."""
    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    num_blocks: int
    block_size: int

    def check(self, token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the problem."""
        params.validate()
        if not token_ids:
            raise ValueError("empty prompt: it must contain at least one token")
        vocab = self.vocab_size
        # C-speed passes (a prompt of 1,000 ids in ~20 us): only plain ints, then the range
        if not set(map(type, token_ids)) <= {int} or min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams.n must be <= max_num_seqs ({self.max_num_seqs}): "
                             f"the n completions run together, got {params.n}")
        for name in ("logit_bias", "allowed_token_ids"):
            ids = getattr(params, name) or ()
            if any(t >= vocab for t in ids):
                raise ValueError(f"SamplingParams.{name} token ids must be in [0, {vocab}) (the vocabulary), "
                                 f"got {max(ids)}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"SamplingParams.{name} must be <= the vocabulary size ({vocab}), got {k}")
        max_len = self.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, it must be shorter than "
                             f"max_model_len ({max_len})")
        needed = min(max_len, len(token_ids) + (params.max_tokens or max_len))
        capacity = self.num_blocks * self.block_size
        if needed > capacity:
            raise ValueError(f"request needs up to {needed} KV slots (prompt {len(token_ids)} + max_tokens "
                             f"{params.max_tokens}) but the KV pool holds only {capacity} "
                             f"(num_blocks {self.num_blocks} x block_size {self.block_size})")


def resolve_model_path(config: EngineConfig) -> str:
    if config.model_path is None:
        from vllm_lite.default_model import default_model_path
        return default_model_path()
    path = os.path.expanduser(config.model_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {config.model_path!r} is not a directory (no hub downloads)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model path {config.model_path!r} has no config.json")
    return path


class LLMEngine:
    # whether a caller reads each live request's text after every step (the server streams it);
    # otherwise a request without stop strings gets its text decoded once, when it ends
    stream_text = False

    def __init__(self, config: EngineConfig) -> None:
        from vllm_lite.models import get_model_class

        self.model_path = resolve_model_path(config)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        get_model_class(self.hf_config)  # unsupported architecture: fail before anything heavy
        self.tokenizer = self._load_tokenizer(config)
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        window = getattr(self.hf_config, "sliding_window", None)
        if window and (self.hf_config.model_type == "mistral" or getattr(self.hf_config, "use_sliding_window", False)):
            model_max = min(model_max, window)  # no sliding-window attention here: stay inside the window
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"config key 'max_model_len' ({config.max_model_len}) exceeds the model's limit "
                             f"({model_max}: max_position_embeddings, or its sliding window)")
        self.config = config = dataclasses.replace(config, max_model_len=config.max_model_len or model_max)
        self.eos_token_ids = self._eos_token_ids()

        if config.tensor_parallel_size > 1:
            from vllm_lite.worker.tp_executor import TPExecutor
            self.runner = TPExecutor(config, self.hf_config, self.model_path)
        else:
            from vllm_lite.worker.model_runner import ModelRunner
            self.runner = ModelRunner(config, self.hf_config, self.model_path)
            self.runner.allocate_kv_cache(config.num_blocks or self.runner.default_num_blocks())
        self.device = self.runner.device
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len)
        self.limits = RequestLimits(self.hf_config.vocab_size, config.max_model_len, config.max_num_seqs,
                                    self.block_manager.num_blocks, config.block_size)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sequences: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        self.inflight: _InFlight | None = None
        self.overlap = getattr(self.runner, "supports_overlap", False)
        self._token_texts: dict[int, str] = {}  # decoded_token of logprobs, per token id
        self._params: _ParamsBatch | None = None  # of the last sampling batch
        self._history = TokenHistory(self.device, self._to_device)  # penalized sequences' tokens

    def _load_tokenizer(self, config: EngineConfig):
        """The folder's tokenizer if it fits the model. A folder without one (a dummy-weight
        benchmark folder, say), or one far smaller than the model's vocabulary (transformers
        makes a 1-token tokenizer for a folder holding only a Qwen ``config.json``), gives
        token ids only, with one warning. An explicit ``tokenizer_path`` must work."""
        source = config.tokenizer_path or self.model_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as e:
            if config.tokenizer_path is not None:
                raise
            reason = f"no usable tokenizer in {source!r} ({type(e).__name__})"
        else:
            vocab = self.hf_config.vocab_size
            if len(tokenizer) >= vocab // 2:
                return tokenizer
            reason = (f"the tokenizer in {source!r} has {len(tokenizer)} tokens "
                      f"for a model vocabulary of {vocab}")
            if config.tokenizer_path is not None:
                raise ValueError(f"config key 'tokenizer_path': {reason}")
        warnings.warn(f"{reason}: it is not used; prompts must be token ids and outputs carry no text",
                      stacklevel=3)
        return None

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        try:
            gen = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        except OSError:
            pass
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Validate and queue one request. Bad input raises ValueError and changes nothing."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self.check_request(token_ids, params)
        if request_id is not None and request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.tokenizer is None and (params.detokenize and params.stop_strings):
            raise ValueError("stop strings need a tokenizer; this model folder has none")
        seq = Sequence(token_ids, params, request_id, text)
        self._give_generator_and_detokenizer(seq)
        if params.prompt_logprobs is not None and len(token_ids) > 1:
            seq.max_chunk_tokens = PROMPT_LOGPROBS_CHUNK
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _give_generator_and_detokenizer(self, seq: Sequence) -> None:
        params = seq.params
        if params.seed is not None:  # completion i of a seeded request: seed + i, as vLLM
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + seq.index)
        if params.detokenize and self.tokenizer is not None:
            # text read only at the end (offline, no stop string to find): decoded once there
            at_end = not (self.stream_text or params.stop_strings)
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens,
                                               at_end=at_end)

    def check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        self.limits.check(token_ids, params)

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        for s in seq.group if seq is not None else ():
            if not s.is_finished:
                self.scheduler.finish(s, "abort")

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that finished.

        With overlap (one device, the default) the step is pipelined: the next batch is
        scheduled and launched *before* the previous batch's sampled tokens are read back, so
        the host's bookkeeping runs while the GPU computes. A sampled token is a placeholder
        (-1) in ``seq.token_ids`` until it is read back; the model runner feeds it to the next
        step straight from the device. A sequence that turns out to have stopped costs one
        wasted token of compute, which is discarded."""
        batch = self.scheduler.schedule()
        previous, self.inflight = self.inflight, None
        if batch:
            self.inflight = self._launch(batch, previous)
        outputs = self._process(previous) if previous else []
        if self.inflight is not None and not self.overlap:
            outputs += self._process(self.inflight)
            self.inflight = None
        return outputs

    def _launch(self, batch, previous: _InFlight | None) -> _InFlight | None:
        step = self.runner.prepare(batch)
        sample_rows, prompt_plan = self._plan_logits(batch, step)
        if previous is not None:
            logits = self.runner.execute(step, previous.tokens)
        else:
            logits = self.runner.execute(step)
        if prompt_plan:
            self._record_prompt_logprobs(logits, prompt_plan)
        caching, bs = self.block_manager.enable_prefix_caching, self.block_manager.block_size
        sampling_seqs, parents = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq.token_ids):  # it samples its next token
                if seq.needs_fork:  # its prompt is in the cache: the other completions start here
                    parents.append(len(sampling_seqs))
                sampling_seqs.append(seq)
            # a block is full, and its last token is no placeholder (one is keyed a step later)
            if caching and seq.num_computed_tokens >= (seq.num_cached_blocks + 1) * bs and \
                    seq.token_ids[(seq.num_cached_blocks + 1) * bs - 1] != PLACEHOLDER:
                self.block_manager.cache_full_blocks(seq)
        if not sampling_seqs:
            return None
        for i in parents:
            while sampling_seqs[i].needs_fork:
                sampling_seqs.append(self._fork(sampling_seqs[i]))
                sample_rows.append(sample_rows[i])  # their first token is drawn from the same logits
        if len(sample_rows) != len(logits):
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        sampling = self._sampling_batch(sampling_seqs, previous.tokens if previous is not None else None)
        out = self.sampler.sample(logits, sampling, self.generator)
        logprob_rows = None
        if out.logprobs is not None:
            logprob_rows = [-1] * len(sampling_seqs)
            for j, i in enumerate(i for i, s in enumerate(sampling_seqs) if s.logprobs is not None):
                logprob_rows[i] = j
        positions = []
        for i, seq in enumerate(sampling_seqs):
            positions.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
            seq.inflight_index = i
        return _InFlight(sampling_seqs, positions, out.tokens, out.logprobs, logprob_rows)

    def _fork(self, parent: Sequence) -> Sequence:
        """The parent's next completion, right after the parent's prompt was computed. It shares
        the prompt's full KV blocks (reference counted) and recomputes the tokens of the last,
        partial block into a block of its own in its first step (at most block_size - 1 tokens),
        so no shared block is ever written and no KV copy is needed (vLLM v1 shares n
        completions' prompt the same way, through its prefix cache). With prefix caching the
        shared blocks are cached ones: exactly what a lookup of the prompt would find."""
        child = parent.fork()
        num_full = parent.num_prompt_tokens // self.block_manager.block_size
        self.block_manager.share(child, parent.block_table[:num_full])
        child.num_computed_tokens = num_full * self.block_manager.block_size
        self._give_generator_and_detokenizer(child)
        self.scheduler.add_forked(child)
        return child

    def _plan_logits(self, batch, step) -> tuple[list[int], list[tuple[Sequence, int, int]]]:
        """Which rows of the logits are which. Returns, per sampling sequence (in batch order),
        its row in the logits the runner will return, and for prompt_logprobs, (sequence, first
        row, number of rows) whose logits score its next prompt tokens. The runner returns the
        logits of the step's ``logits_indices`` rows (the sampling ones); the prompt rows are
        added there, so they are computed only for requests that ask."""
        if not any(s.prompt_logprobs is not None for s in batch.seqs):
            return list(range(len(step.logits_indices))), []
        rows, sample_rows, plan = [], [], []
        qsl = step.query_start_loc
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if seq.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1; tokens before len(prompt_logprobs)
                # are scored already (an earlier chunk, or the run before a preemption)
                lo = max(start, len(seq.prompt_logprobs) - 1)
                hi = min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    plan.append((seq, len(rows), hi - lo))
                    rows.extend(range(qsl[i] + lo - start, qsl[i] + hi - start))
            if start + n == len(seq):
                sample_rows.append(len(rows))
                rows.append(qsl[i] + n - 1)
        step.logits_indices = np.asarray(rows, np.int64)
        return sample_rows, plan

    def _record_prompt_logprobs(self, logits: torch.Tensor, plan: list[tuple[Sequence, int, int]]) -> None:
        """Append the scored prompt tokens' {token id: Logprob} to their sequences. Waits for
        the step (prompt logprobs are read back at once, only for requests that ask)."""
        rows = torch.cat([torch.arange(r, r + c) for _, r, c in plan]).to(logits.device)
        targets = [t for seq, _, c in plan
                   for t in seq.prompt_token_ids[len(seq.prompt_logprobs):len(seq.prompt_logprobs) + c]]
        k = max(seq.params.prompt_logprobs for seq, _, _ in plan)
        target_dev = torch.tensor(targets, device=logits.device)
        parts = []
        for a in range(0, len(targets), 1024):  # bounds the CPU path's [rows, vocab] fp32 temporaries
            parts.append(token_logprobs(logits, rows[a:a + 1024], target_dev[a:a + 1024], k))
        token_lp, rank, top_lp, top_ids = (torch.cat(p).tolist() for p in zip(*parts))
        i = 0
        for seq, _, c in plan:
            kk = seq.params.prompt_logprobs
            for _ in range(c):
                self._add_logprobs(seq, seq.prompt_logprobs, targets[i], token_lp[i], rank[i], top_lp[i][:kk],
                                   top_ids[i][:kk])
                i += 1
            if len(seq.prompt_logprobs) == seq.num_prompt_tokens:  # all scored: chunks as usual again
                seq.max_chunk_tokens = MAX_CHUNK

    def _add_logprobs(self, seq: Sequence, into: FlatLogprobs, token_id: int, logprob: float, rank: int,
                      top_logprobs: list[float], top_ids: list[int]) -> None:
        """vLLM's layout: the chosen token first, then the top-k (ranks 1..k)."""
        texts = [self._token_text(t) for t in (token_id, *top_ids)] if seq.detok is not None else \
            [None] * (1 + len(top_ids))
        into.append(token_id, logprob, rank, top_ids, top_logprobs, texts)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _process(self, inflight: _InFlight) -> list[RequestOutput]:
        """Read back one launched step's tokens, fill its placeholders, run the stop checks."""
        outputs = []
        token_ids = inflight.host_tokens()
        logprobs = inflight.host_logprobs()
        self.num_generated_tokens += len(token_ids)
        for i, (seq, pos, token_id) in enumerate(zip(inflight.seqs, inflight.positions, token_ids)):
            if seq.is_finished:  # stopped on an earlier token, or aborted: this one is void
                continue
            seq.token_ids[pos] = token_id
            if seq.logprobs is not None:
                j, k = inflight.logprob_rows[i], seq.params.logprobs
                token_lp, rank, top_lp, top_ids = (x[j] for x in logprobs)
                self._add_logprobs(seq, seq.logprobs, token_id, token_lp, rank, top_lp[:k], top_ids[:k])
                seq.cumulative_logprob += token_lp
            self._accept_token(seq, pos, token_id)
            if seq.is_finished and all(s.is_finished for s in seq.group):
                outputs.append(self._output(seq))
        return outputs

    def has_unfinished_requests(self) -> bool:
        pending = self.inflight is not None and not all(s.is_finished for s in self.inflight.seqs)
        return self.scheduler.has_unfinished() or pending

    def _sampling_batch(self, seqs: list[Sequence], prev_tokens: torch.Tensor | None = None) -> SamplingBatch:
        """The step's sampling parameters as device tensors. What depends only on the requests'
        parameters is built once per batch (the same sequences in the same rows, as most decode
        steps are) and kept on the device; min_tokens bans and penalties follow the output, so
        they are redone every step. ``prev_tokens``: the step in flight's sampled tokens, where
        an output token is still a placeholder (penalties)."""
        seq_ids = [s.seq_id for s in seqs]
        if self._params is None or seq_ids != self._params.seq_ids:
            self._params = self._params_batch(seqs, seq_ids)
        params = self._params
        banned = [(row, stop_ids) for row, stop_ids in params.min_tokens_rows
                  if seqs[row].num_output_tokens < seqs[row].params.min_tokens]
        penalties = params.batch.penalties
        if penalties is not None:
            tokens, lengths = self._history.update([seqs[r] for r in params.penalized], prev_tokens)
            penalties = dataclasses.replace(penalties, tokens=tokens, lengths=lengths)
        elif not banned:
            return params.batch
        return dataclasses.replace(params.batch, banned=banned, penalties=penalties)

    def _params_batch(self, seqs: list[Sequence], seq_ids: list[int]) -> _ParamsBatch:
        """Upload what the sampling of ``seqs`` takes from their parameters (on CUDA each
        tensor is copied from pinned memory, without waiting for the step in flight)."""
        ps, tensor = [s.params for s in seqs], self._to_device
        min_tokens_rows = []
        for row, p in enumerate(ps):
            if p.min_tokens > 0:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                min_tokens_rows.append((row, sorted(stop_ids)))
        # one upload. top_k in float32: exact below 2**24, and a larger k keeps every token
        # either way
        values = tensor([[p.temperature for p in ps], [max(p.top_k, 0) for p in ps], [p.top_p for p in ps],
                         [p.min_p for p in ps]], torch.float32)
        batch = SamplingBatch(
            temperature=values[0], top_k=values[1].long(), top_p=values[2], min_p=values[3],
            generators=[s.generator for s in seqs],
            banned=[],
            all_greedy=all(p.greedy for p in ps),
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            any_min_p=any(p.min_p > 0 for p in ps),
            any_greedy=any(p.greedy for p in ps),
        )
        if not any(p.needs_extras for p in ps):
            return _ParamsBatch(seq_ids, batch, min_tokens_rows, [])
        # the extras, each only when some row uses it
        allowed = [r for r, p in enumerate(ps) if p.allowed_token_ids is not None]
        if allowed:
            keep = self._flat_index([ps[r].allowed_token_ids for r in allowed])
            batch.allowed = (tensor(allowed, torch.int64), *keep)
        biased = [r for r, p in enumerate(ps) if p.logit_bias]
        if biased:
            local, tokens = self._flat_index([ps[r].logit_bias for r in biased])  # dict keys: token ids
            bias = tensor([b for r in biased for b in ps[r].logit_bias.values()], torch.float32)
            batch.logit_bias = (tensor(biased, torch.int64)[local], tokens, bias)
        penalized = [r for r, p in enumerate(ps) if p.has_penalties]
        wants_logprobs = [r for r, p in enumerate(ps) if p.logprobs is not None]
        if wants_logprobs:
            batch.logprob_rows = tensor(wants_logprobs, torch.int64)
            batch.num_logprobs = max(ps[r].logprobs for r in wants_logprobs)
        if penalized:
            rows = None if len(penalized) == len(ps) else tensor(penalized, torch.int64)  # None: all
            batch.penalties = self._penalties([seqs[r] for r in penalized], rows)
        return _ParamsBatch(seq_ids, batch, min_tokens_rows, penalized)

    def _penalties(self, seqs: list[Sequence], rows: torch.Tensor | None) -> Penalties:
        """The penalized rows' penalties; their tokens are written to the history every step."""
        tensor, ps = self._to_device, [s.params for s in seqs]
        self._history.assign(seqs)
        values = tensor([[p.repetition_penalty for p in ps], [p.frequency_penalty for p in ps],
                         [p.presence_penalty for p in ps]], torch.float32)
        return Penalties(rows=rows, repetition=values[0], frequency=values[1], presence=values[2],
                         any_repetition=any(p.repetition_penalty != 1.0 for p in ps),
                         prompt_lens=tensor([s.num_prompt_tokens for s in seqs], torch.int64))

    def _to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        host = torch.as_tensor(values, dtype=dtype)
        if self.device.type == "cuda":  # pinned: the copy must not wait for the step in flight
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _flat_index(self, lists) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, x) for every item x of lists[i], as two device tensors: a [rows, vocab] index."""
        rows = np.repeat(np.arange(len(lists)), [len(items) for items in lists])
        return self._to_device(rows, torch.int64), self._to_device([x for items in lists for x in items], torch.int64)

    def _accept_token(self, seq: Sequence, pos: int, token_id: int) -> None:
        """Stop checks for the token at ``pos`` (later positions may hold placeholders)."""
        p = seq.params
        num_output = pos + 1 - seq.num_prompt_tokens
        can_stop = num_output >= p.min_tokens
        if can_stop and (token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids)):
            if seq.detok is not None and p.include_stop_str_in_output:  # vLLM: the stop token's text too
                seq.detok.add(token_id)
            return self._finish(seq, "stop", token_id, pos)
        delta = seq.detok.add(token_id) if seq.detok is not None else ""
        if delta and p.stop_strings and num_output > p.min_tokens:
            # vLLM's rule: the first stop string (in the given order) that ends inside this
            # token's text; text of the first min_tokens tokens never ends one
            text = seq.detok.text
            for stop in p.stop_strings:
                at = text.find(stop, max(0, len(text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    seq.detok.text = text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    return self._finish(seq, "stop", stop, pos)
        if seq.at_length_limit(pos + 1, self.config.max_model_len):
            return self._finish(seq, "length", None, pos)

    def _finish(self, seq: Sequence, reason: str, stop_reason=None, pos: int | None = None) -> None:
        """End ``seq``: tokens after ``pos`` (placeholders of a step already launched) are
        dropped."""
        if pos is not None:
            del seq.token_ids[pos + 1:]
        if seq.detok is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            seq.detok.flush()
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The request of ``seq`` once all its completions are finished."""
        completions = [
            CompletionOutput(s.index, s.detok.text if s.detok is not None else "", s.output_token_ids,
                             s.cumulative_logprob if s.logprobs is not None else None, s.logprobs,
                             s.finish_reason, s.stop_reason)
            for s in seq.group]
        first = seq.group[0]
        self.sequences.pop(first.request_id, None)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, first.prompt_logprobs,
                             completions, True, first.num_cached_tokens)

    # ---- the prefix cache ----------------------------------------------------------------
    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (first admissions), as vLLM counts them."""
        return self.scheduler.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, the tokens found cached (not computed)."""
        return self.scheduler.prefix_cache_hits

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing done) while a request holds KV blocks."""
        return self.block_manager.reset_prefix_cache()

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
