"""The offline Python API in vLLM's shape: ``LLM(model=PATH).generate(prompts, params)``."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import LLMEngine, RequestOutput
from vllm_lite.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **config_overrides) -> None:
        if model is not None:
            config_overrides["model_path"] = model
        config = config_overrides.pop("config", None) or EngineConfig()
        known = set(EngineConfig.__dataclass_fields__)
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        config = EngineConfig(**{**config.to_dict(), **config_overrides})
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in input order. A bad prompt raises ValueError naming it before any work
        starts."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if self.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise ValueError("this model folder has no usable tokenizer: pass prompts as token ids")
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for i, (ids, p) in enumerate(zip(encoded, params)):
            try:
                self.engine.check_request(ids, p)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids_of = {}
        for prompt, ids, p in zip(prompts, encoded, params):
            text = prompt if isinstance(prompt, str) else None
            seq = self.engine.add_request(ids, p, prompt_text=text)
            ids_of[seq.request_id] = len(ids_of)
        return self._run(ids_of, use_tqdm and len(prompts) > 1)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several, through the chat
        template."""
        if self.tokenizer is None:
            raise ValueError(
                "chat needs a tokenizer with a chat template; this model folder has none"
            )
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        encoded = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(encoded, sampling_params, use_tqdm)
        for out, prompt in zip(outputs, prompts):
            out.prompt = prompt
        return outputs

    def _run(self, index_of: dict[str, int], show_progress: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(index_of)
        bar = tqdm(total=len(index_of), desc="Generating", unit="req", disable=not show_progress)
        start, generated_before = time.perf_counter(), self.engine.num_generated_tokens
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id in index_of:
                    results[index_of[out.request_id]] = out
                    bar.update(1)
            generated = self.engine.num_generated_tokens - generated_before
            bar.set_postfix_str(
                f"{generated / (time.perf_counter() - start):.0f} tok/s out", refresh=False
            )
        bar.close()
        return results

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (say, between benchmark runs). Returns False, and does
        nothing, while a request holds KV blocks; ``generate`` returns with none held."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
