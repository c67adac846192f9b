"""The engine's brain (the seed's executor): the request queue, one scheduling + model step at a
time, sampling (with logprobs, and the fork of a request's n completions), token-level stop
checks (stop tokens, EOS, length), and reclaiming finished sequences.

The core part (``core_step``) deals in token ids only; text, stop strings and the outputs a user
reads are the output processor's (``output_processor.py``): ``step`` runs both in one process
(the offline ``LLM``); a server runs the core in a process of its own and the output processor
in its front end."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from vllm_lite.config import EngineConfig
from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.output_processor import (
    CompletionOutput,  # noqa: F401 - re-exported
    CoreOutputs,
    OutputProcessor,
    RequestOutput,
)
from vllm_lite.engine.scheduler import Scheduler
from vllm_lite.engine.sequence import MAX_CHUNK, PLACEHOLDER, Sequence
from vllm_lite.engine.tracer import StepTracer
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.structured_output import (
    ACCEPTED,
    ENDED,
    REFUSED_COMPLETE,
    StructuredOutputManager,
)
from vllm_lite.worker.batch import ScheduledBatch
from vllm_lite.worker.logprobs import token_logprobs
from vllm_lite.worker.sampler import Penalties, Sampler, SamplingBatch, TokenHistory

# Prompt chunks of a request that wants prompt_logprobs: the logits of every row are kept, so a
# chunk is capped (512 rows x a 150k vocabulary is 150 MB in bf16, not 2.5 GB for 8192 rows).
PROMPT_LOGPROBS_CHUNK = 512
# Offline, the tokens of a request with stop strings go to the output processor (its text, the
# stop check) every this many steps, not every step: a batched decode of a few tokens costs
# about what one token's does. A stop string is then found up to this many tokens late; the
# core computes them for nothing, and they are dropped (the text ends where it would have).
TEXT_EVERY = 8


class _InFlight:
    """A launched step: which sequences sample, where their token goes, its logits and sampling
    batch until it is sampled (``LLMEngine._sample``), then the device tokens and the sampled
    tokens' logprobs for the rows that asked (``logprob_rows[i]``: row of sequence i in those
    tensors, -1 if none); ``grammar_rows``: the sequences with a structured output, and
    ``ahead``: (the step before's grammar worker job, each of those rows' row in that step or
    -1). ``processed``: read back already (``_process``)."""

    processed = False
    params: _ParamsBatch | None = None  # its rows' sampling parameters
    grammar = None  # its matchers' advance on the grammar worker (GrammarAdvance), if handed over
    tokens: torch.Tensor | None = None  # sampled (None while its sampling waits: see run_batch)

    def __init__(
        self,
        seqs: list[Sequence],
        positions: list[int],
        logits: torch.Tensor,
        sampling: SamplingBatch,
        logprob_rows: list[int] | None = None,
        grammar_rows: list[int] | None = None,
        ahead: tuple | None = None,
    ) -> None:
        self.seqs, self.positions, self.logits, self.sampling = seqs, positions, logits, sampling
        self.logprob_rows = logprob_rows
        self.grammar_rows = grammar_rows or []
        self.ahead = ahead

    def sampled(self, tokens: torch.Tensor, logprobs: tuple | None) -> None:
        """The step's sampled tokens (and logprobs): start their copy back to the host."""
        self.tokens, self.logits, self.sampling, self.ahead = tokens, None, None, None
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
    grammar_rows: list[int] = field(default_factory=list)  # rows with structured outputs
    # (request ids, completion indexes) of the rows, made when first needed (``_process``)
    row_ids: tuple[list[str], list[int]] | None = None


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
            raise ValueError(
                f"SamplingParams.n must be <= max_num_seqs ({self.max_num_seqs}): "
                f"the n completions run together, got {params.n}"
            )
        for name in ("logit_bias", "allowed_token_ids"):
            ids = getattr(params, name) or ()
            if any(t >= vocab for t in ids):
                raise ValueError(
                    f"SamplingParams.{name} token ids must be in [0, {vocab}) (the vocabulary), "
                    f"got {max(ids)}"
                )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(
                    f"SamplingParams.{name} must be <= the vocabulary size ({vocab}), got {k}"
                )
        max_len = self.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, it must be shorter than "
                f"max_model_len ({max_len})"
            )
        needed = min(max_len, len(token_ids) + (params.max_tokens or max_len))
        capacity = self.num_blocks * self.block_size
        if needed > capacity:
            raise ValueError(
                f"request needs up to {needed} KV slots (prompt {len(token_ids)} + max_tokens "
                f"{params.max_tokens}) but the KV pool holds only {capacity} "
                f"(num_blocks {self.num_blocks} x block_size {self.block_size})"
            )


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned: the copy must not wait for the step in flight
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def resolve_model_path(config: EngineConfig) -> str:
    if config.model_path is None:
        from vllm_lite.default_model import default_model_path

        return default_model_path()
    path = os.path.expanduser(config.model_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {config.model_path!r} is not a directory (no hub downloads)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model path {config.model_path!r} has no config.json")
    return path


class LLMEngine:
    def __init__(self, config: EngineConfig, output_processor: bool = True) -> None:
        """``output_processor``: False in a server's engine-core process (its front end has it)."""
        from vllm_lite.models import get_model_class

        self.model_path = resolve_model_path(config)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        get_model_class(self.hf_config)  # unsupported architecture: fail before anything heavy
        self.tokenizer = self._load_tokenizer(config)
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        window = getattr(self.hf_config, "sliding_window", None)
        windowed = self.hf_config.model_type in ("mistral", "mixtral") or getattr(
            self.hf_config, "use_sliding_window", False
        )
        if window and windowed:
            model_max = min(
                model_max, window
            )  # no sliding-window attention here: stay inside the window
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"config key 'max_model_len' ({config.max_model_len}) exceeds the model's limit "
                f"({model_max}: max_position_embeddings, or its sliding window)"
            )
        self.config = config = dataclasses.replace(
            config, max_model_len=config.max_model_len or model_max
        )
        self.eos_token_ids = self._eos_token_ids()

        if config.tensor_parallel_size > 1:
            from vllm_lite.worker.tp_executor import TPExecutor

            self.runner = TPExecutor(config, self.hf_config, self.model_path)
        else:
            from vllm_lite.worker.model_runner import ModelRunner

            self.runner = ModelRunner(config, self.hf_config, self.model_path)
            try:
                self.runner.allocate_kv_cache(config.num_blocks or self.runner.default_num_blocks())
            except BaseException:  # no room for the pool, a failed capture: the traceback keeps
                self.runner.close()  # this half-built engine alive, but not its GPU memory
                raise
        self.device = self.runner.device
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_model_len,
        )
        self.limits = RequestLimits(
            self.hf_config.vocab_size,
            config.max_model_len,
            config.max_num_seqs,
            self.block_manager.num_blocks,
            config.block_size,
        )
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sequences: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        self.inflight: _InFlight | None = None
        self.overlap = getattr(self.runner, "supports_overlap", False)
        self.output_processor = OutputProcessor(self.tokenizer) if output_processor else None
        # every accepted token goes out with its step (a server's core); else only those that
        # carry logprobs, the rest when the text needs them (TEXT_EVERY) or the sequence ends
        self.report_every_token = not output_processor
        self._num_steps = 0
        self._outputs = CoreOutputs()  # of the step being processed
        self._params: _ParamsBatch | None = None  # of the last sampling batch
        # penalized sequences' tokens; given a function of the device, not a bound method: the
        # engine must hold no reference cycle, so that dropping it frees its GPU memory at once
        self._history = TokenHistory(self.device, functools.partial(to_device, device=self.device))
        self._structured = None  # StructuredOutputManager, made for the first structured request
        self.tracer = None
        if self.device.type == "cuda":
            try:
                self._warm_up_full_batch()
            except BaseException:
                self.close()  # a failed start must not hold the GPU through its traceback
                raise
            gc.collect()
            gc.freeze()  # what start-up built is never garbage: later collections skip it (as vLLM)
        if config.trace:  # after the warm-up, whose throw-away requests are not traced
            self.tracer = StepTracer(config.trace, self)

    def _warm_up_full_batch(self) -> None:
        """What a first ``generate`` paid over the second that the runner's kernel warm-up does
        not cover, paid here on throw-away requests: a full batch (``max_num_seqs``) filling
        the token budget, then decoding with both sampling paths, so that the host arrays that
        grow with the batch (block-table and sampling rows, pinned copies) reach full size and
        the allocator holds the blocks of a full step after the KV pool took its share."""
        n, cfg, steps = self.config.max_num_seqs, self.config, 4
        slots = self.block_manager.num_blocks * cfg.block_size  # one request must fit the pool
        prompt_len = min(cfg.max_num_batched_tokens // n, cfg.max_model_len // 2, slots - steps)
        if prompt_len < 1:  # a pool too small for a warm-up request
            return
        for i in range(n):
            params = SamplingParams(
                temperature=0.0 if i % 2 else 1.0,
                max_tokens=steps,
                ignore_eos=True,
                detokenize=False,
            )
            prompt = [i % self.hf_config.vocab_size] * prompt_len
            self.add_request(prompt, params, request_id=f"warm-up-{i}")
        while self.has_unfinished_requests():
            outputs = self.core_step()
            if self.output_processor is not None:
                self.output_processor.process(outputs)
        self.block_manager.reset_prefix_cache()
        self.num_generated_tokens = 0
        s = self.scheduler
        s.num_preemptions = s.prefix_cache_queries = s.prefix_cache_hits = 0

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
            reason = (
                f"the tokenizer in {source!r} has {len(tokenizer)} tokens "
                f"for a model vocabulary of {vocab}"
            )
            if config.tokenizer_path is not None:
                raise ValueError(f"config key 'tokenizer_path': {reason}")
        warnings.warn(
            f"{reason}: it is not used; prompts must be token ids and outputs carry no text",
            stacklevel=3,
        )
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
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_text: str | None = None,
    ) -> Sequence:
        """Validate and queue one request. Bad input raises ValueError and changes nothing.
        ``prompt_text``: the text of a prompt given as token ids, for its output."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = prompt_text, list(prompt)
        self.check_request(token_ids, params)
        if request_id is not None and request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.tokenizer is None and (params.detokenize and params.stop_strings):
            raise ValueError("stop strings need a tokenizer; this model folder has none")
        seq = Sequence(token_ids, params, request_id, text)
        self._give_generator(seq)
        if params.prompt_logprobs is not None and len(token_ids) > 1:
            seq.max_chunk_tokens = PROMPT_LOGPROBS_CHUNK
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        if self.output_processor is not None:
            self.output_processor.add_request(seq.request_id, text, seq.prompt_token_ids, params)
        return seq

    def _give_generator(self, seq: Sequence) -> None:
        """Its random generator (seeded requests) and its grammar matcher (structured outputs):
        one each per completion."""
        params = seq.params
        if params.structured_outputs is not None:
            seq.grammar = self.structured_output_manager().matcher(params.structured_outputs)
        if params.seed is not None:  # completion i of a seeded request: seed + i, as vLLM
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + seq.index)

    def check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        self.limits.check(token_ids, params)
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this model folder has none")

    def structured_output_manager(self):
        """The grammar compiler for this tokenizer and vocabulary (made on first use)."""
        if self._structured is None:
            self._structured = StructuredOutputManager(
                self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids
            )
            self._structured.warm_up(self.device, self.runner.dtype, self.config.max_num_seqs)
        return self._structured

    def abort_request(self, request_id: str) -> None:
        """End a request's unfinished completions; reported as aborted in the next step's
        outputs."""
        seq = self.sequences.pop(request_id, None)
        if self.output_processor is not None:  # in-process: nobody reads an aborted request
            self.output_processor.abort_request(request_id)
        for s in seq.group if seq is not None else ():
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
                row = self._outputs.add(s.request_id, s.index, -1)
                self._outputs.finished.append((row, "abort", None))

    def stop_completion(self, request_id: str, index: int) -> None:
        """A stop string ended completion ``index`` (the output processor found it): free it now;
        the tokens it may still get from a step in flight are dropped."""
        seq = self.sequences.get(request_id)
        if seq is None or index >= len(seq.group) or seq.group[index].is_finished:
            return
        self.scheduler.finish(seq.group[index], "stop")
        if all(s.is_finished for s in seq.group) and len(seq.group) >= seq.params.n:
            self.sequences.pop(request_id, None)

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step and its output processing; returns the requests that finished."""
        outputs = self.core_step()
        self._num_steps += 1
        if self._num_steps % TEXT_EVERY == 0:
            self._hand_over_text_tokens(outputs)
        processed = self.output_processor.process(outputs)
        for request_id, index in processed.stops:
            self.stop_completion(request_id, index)
        return processed.finished

    def _hand_over_text_tokens(self, outputs: CoreOutputs) -> None:
        """The accepted tokens not yet handed over of every request whose text is watched (stop
        strings)."""
        for first in self.sequences.values():
            p = first.params
            if not (p.stop_strings and p.detokenize) or p.logprobs is not None:
                continue
            for seq in first.group:
                tokens, num_prompt = seq.token_ids, seq.num_prompt_tokens
                end = len(tokens)
                while end > num_prompt and tokens[end - 1] == PLACEHOLDER:  # not read back yet
                    end -= 1
                start = num_prompt + seq.num_reported
                if end > start and not seq.is_finished:
                    outputs.token_lists.append((seq.request_id, seq.index, tokens[start:end]))
                    seq.num_reported = end - num_prompt

    def core_step(self) -> CoreOutputs:
        """One engine step; returns the token ids it accepted (and the completions that ended).

        With overlap (one device, the default) the step is pipelined: the next batch is
        scheduled and launched *before* the previous batch's sampled tokens are read back, so
        the host's bookkeeping runs while the GPU computes. A sampled token is a placeholder
        (-1) in ``seq.token_ids`` until it is read back; the model runner feeds it to the next
        step straight from the device. A sequence that turns out to have stopped costs one
        wasted token of compute, which is discarded.

        A step with structured outputs samples later: its sampling needs its grammars' masks,
        which need the tokens of the step before. The grammar worker thread advances the
        matchers by those tokens and fills the masks as soon as they are read back
        (``advance_async``), while this thread schedules and prepares the next step; the step
        is sampled only then, just before the next forward pass is launched (``run_batch``).
        So every sampled token was allowed by its matcher's state after all its earlier
        tokens, no placeholder ever reaches a matcher, and the host's work for the next step
        overlaps the matchers' instead of following it."""
        if self.tracer is not None:  # times the step and writes what it did (engine/tracer.py)
            return self.tracer.step(self)
        return self.run_batch(self.scheduler.schedule())

    def run_batch(self, batch: ScheduledBatch) -> CoreOutputs:
        """Launch ``batch``, the scheduler's decision, and process the step before it."""
        previous, self.inflight = self.inflight, None
        if previous is not None and all(s.is_finished for s in previous.seqs):
            previous = None  # void: its sequences all ended before it (a token before, aborts)
        step = self.runner.prepare(batch) if batch else None
        if previous is not None and previous.tokens is None:  # it waited for this prepare
            self._sample(previous)
        if batch:
            self.inflight = self._launch(batch, step, previous)
        if previous:
            self._process(previous)
        if self.inflight is not None and not self.overlap:
            self._process(self.inflight)
            self.inflight = None
        return self.take_outputs()

    def take_outputs(self) -> CoreOutputs:
        """What was reported since the last step (the step's tokens, aborts)."""
        outputs, self._outputs = self._outputs, CoreOutputs()
        return outputs

    def _launch(self, batch, step, previous: _InFlight | None) -> _InFlight | None:
        """The forward pass of ``batch`` (``step``: its prepared arrays) and its bookkeeping;
        the step is sampled now, or, with structured outputs and overlap, by the next
        ``run_batch`` (see ``core_step``)."""
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
            if (
                caching
                and seq.num_computed_tokens >= (seq.num_cached_blocks + 1) * bs
                and seq.token_ids[(seq.num_cached_blocks + 1) * bs - 1] != PLACEHOLDER
            ):
                self.block_manager.cache_full_blocks(seq)
        if not sampling_seqs:
            return None
        for i in parents:
            while sampling_seqs[i].needs_fork:
                sampling_seqs.append(self._fork(sampling_seqs[i]))
                sample_rows.append(
                    sample_rows[i]
                )  # their first token is drawn from the same logits
        if len(sample_rows) != len(logits):
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        sampling = self._sampling_batch(sampling_seqs, previous)
        logprob_rows = None
        if sampling.logprob_rows is not None:  # the sampler reads their logprobs
            logprob_rows = [-1] * len(sampling_seqs)
            wanting = (i for i, s in enumerate(sampling_seqs) if s.params.logprobs is not None)
            for j, i in enumerate(wanting):
                logprob_rows[i] = j
        grammar_rows, ahead = self._params.grammar_rows, None  # (_sampling_batch's parameters)
        if grammar_rows and previous is not None and previous.grammar is not None:
            before = previous.seqs  # each constrained row's row in the step before, or -1
            ahead = (
                previous.grammar,
                [
                    s.inflight_index
                    if s.inflight_index < len(before) and before[s.inflight_index] is s
                    else -1
                    for s in (sampling_seqs[r] for r in grammar_rows)
                ],
            )
        positions = []
        for i, seq in enumerate(sampling_seqs):
            positions.append(len(seq.token_ids))
            if not seq.is_finished:  # (one a step before ended)
                seq.token_ids.append(PLACEHOLDER)
            seq.inflight_index = i
        inflight = _InFlight(
            sampling_seqs, positions, logits, sampling, logprob_rows, grammar_rows, ahead
        )
        inflight.params = self._params  # (its rows' ids for _process)
        if not (grammar_rows and self.overlap):
            self._sample(inflight)
        return inflight

    def _sample(self, inflight: _InFlight) -> None:
        """Sample a launched step (its grammars' masks applied), start its tokens' copy back,
        and hand its live matchers to the grammar worker, which advances them by those tokens
        and fills the next step's masks while the host goes on."""
        sampling, seqs, rows = inflight.sampling, inflight.seqs, inflight.grammar_rows
        live = [i for i, r in enumerate(rows) if not seqs[r].is_finished]  # (others: void)
        rows = [rows[i] for i in live]
        matchers = [seqs[r].grammar for r in rows]
        if rows:
            host_mask, grammar = self._grammar_mask(inflight, live, rows, matchers)
            sampling = dataclasses.replace(sampling, grammar=grammar)
        out = self.sampler.sample(inflight.logits, sampling, self.generator)
        inflight.sampled(out.tokens, out.logprobs)
        if rows and self.overlap:
            inflight.grammar = self._structured.advance_async(
                matchers, rows, len(seqs), inflight.host_tokens, host_mask
            )

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
        self._give_generator(child)
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

    def _record_prompt_logprobs(
        self, logits: torch.Tensor, plan: list[tuple[Sequence, int, int]]
    ) -> None:
        """Append the scored prompt tokens' {token id: Logprob} to their sequences. Waits for
        the step (prompt logprobs are read back at once, only for requests that ask)."""
        rows = torch.cat([torch.arange(r, r + c) for _, r, c in plan]).to(logits.device)
        targets = [
            t
            for seq, _, c in plan
            for t in seq.prompt_token_ids[len(seq.prompt_logprobs) : len(seq.prompt_logprobs) + c]
        ]
        k = max(seq.params.prompt_logprobs for seq, _, _ in plan)
        target_dev = torch.tensor(targets, device=logits.device)
        parts = []
        for a in range(
            0, len(targets), 1024
        ):  # bounds the CPU path's [rows, vocab] fp32 temporaries
            parts.append(token_logprobs(logits, rows[a : a + 1024], target_dev[a : a + 1024], k))
        token_lp, rank, top_lp, top_ids = (torch.cat(p).tolist() for p in zip(*parts))
        i = 0
        for seq, _, c in plan:
            kk = seq.params.prompt_logprobs
            for _ in range(c):  # texts are the output processor's
                top = top_ids[i][:kk]
                seq.prompt_logprobs.append(
                    targets[i], token_lp[i], rank[i], top, top_lp[i][:kk], [None] * (1 + len(top))
                )
                i += 1
            if (
                len(seq.prompt_logprobs) == seq.num_prompt_tokens
            ):  # all scored: chunks as usual again
                seq.max_chunk_tokens = MAX_CHUNK

    def _process(self, inflight: _InFlight) -> None:
        """Read back one launched step's tokens, fill its placeholders, run the stop checks;
        the accepted tokens go into this step's ``CoreOutputs``. Once per step: a constrained
        step's sampling may have read it back already.

        A server's core reports every token (``report_every_token``): the step's rows go into
        the outputs at once after the loop (the batch's ids are made once per batch), not one
        call per row; a row's number is known before (the rows before it, less those skipped)."""
        if inflight.processed:
            return
        inflight.processed = True
        out = self._outputs
        token_ids = inflight.host_tokens()
        logprobs = inflight.host_logprobs()
        self.num_generated_tokens += len(token_ids)
        grammar = self._advance_grammars(inflight, token_ids) if inflight.grammar_rows else {}
        report_all = self.report_every_token
        first_row = len(out.token_ids)
        skipped, refused = [], []  # rows not reported (report_all); completions a grammar ended
        for i, (seq, pos, token_id) in enumerate(zip(inflight.seqs, inflight.positions, token_ids)):
            if seq.is_finished:  # stopped on an earlier token, or aborted: this one is void
                skipped.append(i)
                continue
            status = grammar.get(i, ACCEPTED)
            if status >= REFUSED_COMPLETE:
                self._reject_token(seq, pos, token_id, status == REFUSED_COMPLETE)
                skipped.append(i)
                refused.append(seq)  # reported after the step's rows
                continue
            seq.token_ids[pos] = token_id
            report = report_all or seq.params.logprobs is not None
            if report_all:
                row = first_row + i - len(skipped)
                seq.num_reported += 1
            elif report:
                row = out.add(seq.request_id, seq.index, token_id)
                seq.num_reported += 1
            if pos == seq.num_prompt_tokens and seq.index == 0:  # its first token
                out.num_cached_tokens.append((seq.request_id, seq.num_cached_tokens))
                if seq.prompt_logprobs is not None:
                    out.prompt_logprobs.append((seq.request_id, seq.prompt_logprobs))
            if seq.params.logprobs is not None:
                out.logprobs.append((row, tuple(x[inflight.logprob_rows[i]] for x in logprobs)))
            if status == ENDED:  # its grammar ended (with a stop token)
                self._finish(seq, "stop", token_id, pos)
            else:
                self._accept_token(seq, pos, token_id)
            if seq.is_finished:
                self._report_finished(seq, row if report else None)
        if report_all:
            params = inflight.params
            if params.row_ids is None:  # once per batch
                seqs = inflight.seqs
                params.row_ids = ([s.request_id for s in seqs], [s.index for s in seqs])
            request_ids, indexes = params.row_ids
            if skipped:
                skip = set(skipped)
                kept = [i for i in range(len(token_ids)) if i not in skip]
                request_ids = [request_ids[i] for i in kept]
                indexes = [indexes[i] for i in kept]
                token_ids = [token_ids[i] for i in kept]
            out.req_ids += request_ids
            out.indexes += indexes
            out.token_ids += token_ids
        for seq in refused:
            self._report_finished(seq, None)

    def _report_finished(self, seq: Sequence, row: int | None) -> None:
        """A completion's end into this step's outputs; ``row``: its last token's row, None
        when its tokens were not handed over yet (they go now, then the end)."""
        out = self._outputs
        if row is None:
            rest = seq.token_ids[seq.num_prompt_tokens + seq.num_reported :]
            out.token_lists.append((seq.request_id, seq.index, rest))
            seq.num_reported = seq.num_output_tokens
            row = out.add(seq.request_id, seq.index, -1)
        out.finished.append((row, seq.finish_reason, seq.stop_reason))
        if all(s.is_finished for s in seq.group) and len(seq.group) >= seq.params.n:
            self.sequences.pop(seq.request_id, None)

    def _advance_grammars(self, inflight: _InFlight, token_ids: list[int]) -> dict[int, int]:
        """Each live constrained row's matcher takes its token (on the worker thread if the
        step's sampling handed it over, else here, in one batched call): row -> status code,
        from the worker only for the rows that are not ACCEPTED (``GrammarAdvance.verdicts``)."""
        if inflight.grammar is not None:
            return inflight.grammar.verdicts(token_ids, self._structured.stop_token_ids)
        seqs = inflight.seqs
        rows = [i for i in inflight.grammar_rows if not seqs[i].is_finished]
        if not rows:
            return {}
        codes = self._structured.advance(
            [seqs[i].grammar for i in rows], [token_ids[i] for i in rows]
        )
        return dict(zip(rows, codes))

    def has_unfinished_requests(self) -> bool:
        pending = self.inflight is not None and not all(s.is_finished for s in self.inflight.seqs)
        return self.scheduler.has_unfinished() or pending

    def _sampling_batch(
        self, seqs: list[Sequence], previous: _InFlight | None = None
    ) -> SamplingBatch:
        """The step's sampling parameters as device tensors, but its grammars' masks
        (``_grammar_mask``). What depends only on the requests' parameters is built once per
        batch (the same sequences in the same rows, as most decode steps are) and kept on the
        device; min_tokens bans and penalties follow the output, so they are redone every step.
        ``previous``: the step in flight, whose sampled tokens are still placeholders (penalties
        read them on the device)."""
        seq_ids = [s.seq_id for s in seqs]
        if self._params is None or seq_ids != self._params.seq_ids:
            self._params = self._params_batch(seqs, seq_ids)
        params = self._params
        banned = [
            (row, stop_ids)
            for row, stop_ids in params.min_tokens_rows
            if seqs[row].num_output_tokens < seqs[row].params.min_tokens
        ]
        penalties = params.batch.penalties
        if penalties is not None:
            prev_tokens = previous.tokens if previous is not None else None
            tokens, lengths = self._history.update([seqs[r] for r in params.penalized], prev_tokens)
            penalties = dataclasses.replace(penalties, tokens=tokens, lengths=lengths)
        elif not banned:
            return params.batch
        return dataclasses.replace(params.batch, banned=banned, penalties=penalties)

    def _grammar_mask(
        self, inflight: _InFlight, live: list[int], rows: list[int], matchers: list
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[int] | None]]:
        """The launched step's grammar masks: (the mask on the host, ``SamplingBatch.grammar``).
        Its constrained ``rows`` that go on (``live``: their indexes in
        ``inflight.grammar_rows``) each allow what its matcher accepts after all the tokens
        before (the step before is processed: its matchers took their tokens). The rows the
        grammar worker filled ahead are taken from it (``inflight.ahead``), the others filled
        here."""
        ahead = inflight.ahead
        if ahead is not None:
            ahead = (ahead[0], [ahead[1][i] for i in live])
        num_rows = len(inflight.seqs)
        host = self._structured.bitmask(matchers, rows, num_rows, ahead)
        some = None if len(rows) == num_rows else rows
        if self.device.type != "cuda":
            return host, (host, some)
        # pinned: the copy does not wait for the step in flight, and the previous step that
        # used this buffer was read back before this one launched. The rows as a device tensor:
        # xgrammar copies a list from pageable memory, which waits for the step in flight
        if some is not None:
            some = self._to_device(some, torch.int32)
        return host, (host.to(self.device, non_blocking=True), some)

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
        values = tensor(
            [
                [p.temperature for p in ps],
                [max(p.top_k, 0) for p in ps],
                [p.top_p for p in ps],
                [p.min_p for p in ps],
            ],
            torch.float32,
        )
        batch = SamplingBatch(
            temperature=values[0],
            top_k=values[1].long(),
            top_p=values[2],
            min_p=values[3],
            generators=[s.generator for s in seqs],
            banned=[],
            all_greedy=all(p.greedy for p in ps),
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            any_min_p=any(p.min_p > 0 for p in ps),
            any_greedy=any(p.greedy for p in ps),
        )
        grammar_rows = [r for r, s in enumerate(seqs) if s.grammar is not None]
        if not any(p.needs_extras for p in ps):
            return _ParamsBatch(seq_ids, batch, min_tokens_rows, [], grammar_rows)
        # the extras, each only when some row uses it
        allowed = [r for r, p in enumerate(ps) if p.allowed_token_ids is not None]
        if allowed:
            keep = self._flat_index([ps[r].allowed_token_ids for r in allowed])
            batch.allowed = (tensor(allowed, torch.int64), *keep)
        biased = [r for r, p in enumerate(ps) if p.logit_bias]
        if biased:
            local, tokens = self._flat_index(
                [ps[r].logit_bias for r in biased]
            )  # dict keys: token ids
            bias = tensor([b for r in biased for b in ps[r].logit_bias.values()], torch.float32)
            batch.logit_bias = (tensor(biased, torch.int64)[local], tokens, bias)
        penalized = [r for r, p in enumerate(ps) if p.has_penalties]
        wants_logprobs = [r for r, p in enumerate(ps) if p.logprobs is not None]
        if wants_logprobs:
            batch.logprob_rows = tensor(wants_logprobs, torch.int64)
            batch.num_logprobs = max(ps[r].logprobs for r in wants_logprobs)
        if penalized:
            rows = (
                None if len(penalized) == len(ps) else tensor(penalized, torch.int64)
            )  # None: all
            batch.penalties = self._penalties([seqs[r] for r in penalized], rows)
        return _ParamsBatch(seq_ids, batch, min_tokens_rows, penalized, grammar_rows)

    def _penalties(self, seqs: list[Sequence], rows: torch.Tensor | None) -> Penalties:
        """The penalized rows' penalties; their tokens are written to the history every step."""
        tensor, ps = self._to_device, [s.params for s in seqs]
        self._history.assign(seqs)
        values = tensor(
            [
                [p.repetition_penalty for p in ps],
                [p.frequency_penalty for p in ps],
                [p.presence_penalty for p in ps],
            ],
            torch.float32,
        )
        return Penalties(
            rows=rows,
            repetition=values[0],
            frequency=values[1],
            presence=values[2],
            any_repetition=any(p.repetition_penalty != 1.0 for p in ps),
            prompt_lens=tensor([s.num_prompt_tokens for s in seqs], torch.int64),
        )

    def _to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def _flat_index(self, lists) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, x) for every item x of lists[i], as two device tensors: a [rows, vocab] index."""
        rows = np.repeat(np.arange(len(lists)), [len(items) for items in lists])
        return self._to_device(rows, torch.int64), self._to_device(
            [x for items in lists for x in items], torch.int64
        )

    def _accept_token(self, seq: Sequence, pos: int, token_id: int) -> None:
        """Token-level stop checks for the token at ``pos`` (later positions may hold
        placeholders); stop strings are the output processor's."""
        p = seq.params
        stops = token_id in p.stop_token_ids or (
            not p.ignore_eos and token_id in self.eos_token_ids
        )
        if stops and pos + 1 - seq.num_prompt_tokens >= p.min_tokens:
            return self._finish(seq, "stop", token_id, pos)
        if seq.at_length_limit(pos + 1, self.config.max_model_len):
            return self._finish(seq, "length", None, pos)

    def _reject_token(self, seq: Sequence, pos: int, token_id: int, complete: bool) -> None:
        """A token its grammar refuses (only when other constraints, min_tokens or allowed ids,
        left no allowed token) never reaches the output: the sequence ends before it, with
        "stop" if its output is a complete match, else "abort"."""
        warnings.warn(
            f"request {seq.request_id}: token {token_id} breaks its structured output; "
            "it ends there",
            stacklevel=2,
        )
        self._finish(seq, "stop" if complete else "abort", None, pos - 1)

    def _finish(self, seq: Sequence, reason: str, stop_reason=None, pos: int | None = None) -> None:
        """End ``seq``: tokens after ``pos`` (placeholders of a step already launched) are
        dropped."""
        if pos is not None:
            del seq.token_ids[pos + 1 :]
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

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
        if self.tracer is not None:
            self.tracer.close()
        if self._structured is not None:
            self._structured.close()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
