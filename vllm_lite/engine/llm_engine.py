"""The engine's brain (the seed's executor): the request queue, one scheduling + model step at a
time, sampling, stop checks, incremental detokenization, and reclaiming finished sequences."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from vllm_lite.config import EngineConfig
from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.detokenizer import IncrementalDetokenizer
from vllm_lite.engine.scheduler import Scheduler
from vllm_lite.engine.sequence import Sequence
from vllm_lite.sampler import Sampler, SamplingBatch
from vllm_lite.sampling_params import SamplingParams


PLACEHOLDER = -1  # a sampled token not yet read back from the device


class _InFlight:
    """A launched step: which sequences sample, where their token goes, the device tokens."""

    def __init__(self, seqs: list[Sequence], positions: list[int], tokens: torch.Tensor) -> None:
        self.seqs, self.positions, self.tokens = seqs, positions, tokens
        if tokens.is_cuda:  # start the copy back now; host_tokens() waits only for it
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tokens, None

    def host_tokens(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


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
            from vllm_lite.engine.tp_executor import TPExecutor
            self.runner = TPExecutor(config, self.hf_config, self.model_path)
        else:
            from vllm_lite.model_runner import ModelRunner
            self.runner = ModelRunner(config, self.hf_config, self.model_path)
            self.runner.allocate_kv_cache(config.num_blocks or self.runner.default_num_blocks())
        self.device = self.runner.device
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sequences: dict[str, Sequence] = {}
        self.num_generated_tokens = 0
        self.inflight: _InFlight | None = None
        self.overlap = getattr(self.runner, "supports_overlap", False)

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
            reason = f"the tokenizer in {source!r} has {len(tokenizer)} tokens for a model vocabulary of {vocab}"
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
        seq = Sequence(token_ids, params, request_id, text)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if self.tokenizer is None and (params.detokenize and params.stop_strings):
            raise ValueError("stop strings need a tokenizer; this model folder has none")
        if params.detokenize and self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        if not token_ids:
            raise ValueError("empty prompt: it must contain at least one token")
        vocab = self.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, it must be shorter than "
                             f"max_model_len ({max_len})")
        needed = min(max_len, len(token_ids) + (params.max_tokens or max_len))
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if needed > capacity:
            raise ValueError(f"request needs up to {needed} KV slots (prompt {len(token_ids)} + max_tokens "
                             f"{params.max_tokens}) but the KV pool holds only {capacity} "
                             f"(num_blocks {self.block_manager.num_blocks} x block_size {self.block_manager.block_size})")

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

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
        if previous is not None:
            logits = self.runner.execute(step, previous.tokens)
        else:
            logits = self.runner.execute(step)
        sampling_seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        if not sampling_seqs:
            return None
        tokens = self.sampler(logits, self._sampling_batch(sampling_seqs), self.generator)
        positions = []
        for i, seq in enumerate(sampling_seqs):
            positions.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
            seq.inflight_index = i
        return _InFlight(sampling_seqs, positions, tokens)

    def _process(self, inflight: _InFlight) -> list[RequestOutput]:
        """Read back one launched step's tokens, fill its placeholders, run the stop checks."""
        outputs = []
        token_ids = inflight.host_tokens()
        self.num_generated_tokens += len(token_ids)
        for seq, pos, token_id in zip(inflight.seqs, inflight.positions, token_ids):
            if seq.is_finished:  # stopped on an earlier token, or aborted: this one is void
                continue
            seq.token_ids[pos] = token_id
            self._accept_token(seq, pos, token_id)
            if seq.is_finished:
                outputs.append(self._output(seq))
        return outputs

    def has_unfinished_requests(self) -> bool:
        pending = self.inflight is not None and not all(s.is_finished for s in self.inflight.seqs)
        return self.scheduler.has_unfinished() or pending

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        ps = [s.params for s in seqs]

        def tensor(values, dtype):  # pinned: the copy must not wait for the step in flight
            host = torch.tensor(values, dtype=dtype)
            if self.device.type == "cuda":
                host = host.pin_memory()
            return host.to(self.device, non_blocking=True)

        banned = []
        for row, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                stop_ids = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else self.eos_token_ids)
                banned.append((row, sorted(stop_ids)))
        return SamplingBatch(
            temperature=tensor([p.temperature for p in ps], torch.float32),
            top_k=tensor([max(p.top_k, 0) for p in ps], torch.int64),
            top_p=tensor([p.top_p for p in ps], torch.float32),
            min_p=tensor([p.min_p for p in ps], torch.float32),
            generators=[s.generator for s in seqs],
            banned=banned,
            all_greedy=all(p.greedy for p in ps),
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            any_min_p=any(p.min_p > 0 for p in ps),
        )

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
        """End ``seq``: tokens after ``pos`` (placeholders of a step already launched) are dropped."""
        if pos is not None:
            del seq.token_ids[pos + 1:]
        if seq.detok is not None and not isinstance(stop_reason, str):  # a stop string already cut the text
            seq.detok.flush()
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = seq.detok.text if seq.detok is not None else ""
        completion = CompletionOutput(0, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason)
        self.sequences.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.is_finished)

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
