"""vllm-lite: a small, readable LLM inference engine (PagedAttention, continuous batching,
tensor parallelism)."""

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from vllm_lite.entrypoints.llm import LLM
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.structured_output import GuidedDecodingParams, StructuredOutputsParams
from vllm_lite.worker.logprobs import Logprob

__all__ = [
    "LLM",
    "SamplingParams",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "StructuredOutputsParams",
    "GuidedDecodingParams",
]
__version__ = "0.1.0"
