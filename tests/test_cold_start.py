"""Cold start: the engine's own warm-up launches every Triton kernel variant that a user's first
requests can choose, so nothing is compiled inside a user's first ``generate`` (issue 9).

Triton compiles one binary per kernel and specialization (constexprs, dtypes, ints equal to 1 or
divisible by 16, pointers aligned to 16 bytes); ``record_triton_variants`` computes that key with
Triton's own binder. Without a GPU the kernels run under the interpreter, with the GPU's kernel
choices forced: the Triton attention backend, the fused layer kernels, and an H100's SM count
(the decode split count depends on it). Every step here runs eagerly, a superset of the GPU's
launches, where CUDA graphs replay pure decode steps without launching anything. On a GPU the
same test runs compiled and also checks Triton's own cache of binaries.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny_models import make_tiny_model, prompts_of_lengths  # noqa: E402

from vllm_lite import LLM, SamplingParams  # noqa: E402
from vllm_lite.attention import triton_ops  # noqa: E402
from vllm_lite.engine import llm_engine  # noqa: E402
from vllm_lite.layers import fused_ops  # noqa: E402
from vllm_lite.layers.activation import SiluAndMul  # noqa: E402
from vllm_lite.layers.norm import RMSNorm  # noqa: E402
from vllm_lite.layers.rotary import RotaryEmbedding  # noqa: E402
from vllm_lite.worker import sampler  # noqa: E402
from vllm_lite.worker.model_runner import ModelRunner, StepInput  # noqa: E402
from vllm_lite.worker.triton_variants import (
    compiled_variant_counts,
    describe,
    record_triton_variants,
)  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H100_SMS = 132


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen3")), "qwen3")  # per-head q/k norms too


@pytest.fixture
def gpu_kernels(monkeypatch):
    """On CPU, make the layers and the split heuristic choose as they do on an H100."""
    if DEVICE == "cpu":
        monkeypatch.setattr(
            RMSNorm,
            "forward",
            lambda self, x, residual=None: fused_ops.rms_norm(x, self.weight, self.eps, residual),
        )
        monkeypatch.setattr(SiluAndMul, "forward", lambda self, x: fused_ops.silu_and_mul(x))
        monkeypatch.setattr(RotaryEmbedding, "forward", RotaryEmbedding.forward_fused)
        monkeypatch.setattr(triton_ops, "_num_sms", lambda device: H100_SMS)
        for module in (sampler, llm_engine):  # both call logprobs.token_logprobs
            monkeypatch.setattr(module, "token_logprobs", fused_ops.token_logprobs)
        draw = sampler.Sampler._draw
        monkeypatch.setattr(
            sampler.Sampler,
            "_draw",
            staticmethod(lambda logits, batch, gen: draw(logits, batch, gen, fused=True)),
        )


def graph_capture_step(runner, batch: int) -> StepInput:
    """The decode step ``capture_cuda_graphs`` runs for one batch size: the full-width table of
    the static buffers and ``max_model_len`` as the longest context."""
    step = runner.block_zero_step([1] * batch, [1] * batch, num_decodes=batch)
    step.block_tables = np.zeros((batch, -(-runner.max_model_len // runner.block_size)), np.int32)
    step.max_seq_len = runner.max_model_len
    return step


def first_requests(llm: LLM) -> list:
    """A realistic start: one request alone, then a batch of mixed lengths under a small token
    budget (chunked prefill, decodes next to prefill chunks, many decodes), then prompts whose
    prefixes are cached, then one that asks for logprobs. Returns the scheduled batches as
    (decodes, sequences, fresh prefill)."""
    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    batches, schedule = [], engine.scheduler.schedule

    def spy():
        batch = schedule()
        batches.append(
            (
                batch.num_decodes,
                len(batch.seqs),
                all(s.num_computed_tokens == 0 for s in batch.seqs[batch.num_decodes :]),
            )
        )
        return batch

    engine.scheduler.schedule = spy
    greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 10, 11, 12)]
    llm.generate(prompts_of_lengths([5], vocab), greedy[0], use_tqdm=False)
    lens = [3, 17, 33, 40, 64, 70, 100, 130]
    prompts = prompts_of_lengths(lens, vocab, seed=1)
    llm.generate(prompts, [greedy[1 + i % 3] for i in range(len(lens))], use_tqdm=False)
    llm.generate([prompts[6][:48] + [7, 8, 9], prompts[7] + [5]], greedy[0], use_tqdm=False)
    # decodes that share cached blocks (prompt 5's first two): cascade attention
    llm.generate([prompts[5][:40] + [i] * i for i in (1, 2, 3)], greedy[0], use_tqdm=False)
    # random sampling (greedy steps take torch's argmax), on the logits and on their fp32 copy
    with_logprobs = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    penalized = SamplingParams(max_tokens=3, ignore_eos=True, presence_penalty=0.5, seed=3)
    llm.generate(
        prompts_of_lengths([9, 6], vocab, seed=2), [with_logprobs, penalized], use_tqdm=False
    )
    engine.scheduler.schedule = schedule
    return batches


def test_warm_up_compiles_every_kernel_variant_of_the_first_requests(
    path, gpu_kernels, monkeypatch
):
    # cascade attention from 2 sequences sharing one block, so that the tiny run meets it
    monkeypatch.setattr(ModelRunner, "cascade_min_seqs", 2)
    monkeypatch.setattr(ModelRunner, "cascade_min_tokens", 16)
    # bf16, the GPU's dtype (float32 differs only in dtypes and the dots' precision constexpr)
    llm = LLM(
        path,
        dtype="bfloat16",
        device=DEVICE,
        attention_backend="triton",
        block_size=16,
        num_blocks=512,
        max_num_batched_tokens=64,
        max_num_seqs=16,
    )
    runner = llm.engine.runner
    with record_triton_variants() as warm:
        runner.warm_up_kernels()  # what allocate_kv_cache runs on CUDA, at LLM(...)
    compiled = compiled_variant_counts()  # on a GPU, Triton's own cache: the ground truth
    with record_triton_variants() as later:
        for batch in runner.cuda_graph_batch_sizes():  # graph capture, after the warm-up
            runner.execute(graph_capture_step(runner, batch))
        shared_lens, prepare = [], runner.prepare
        runner.prepare = lambda batch: (
            shared_lens.append((step := prepare(batch)).shared_len) or step
        )
        batches = first_requests(llm)

    assert llm.engine.prefix_cache_hits > 0
    assert any(shared_lens), "no decode step ran with cascade attention"
    assert any(0 < decodes < seqs for decodes, seqs, _ in batches), (
        "no decode ran next to a prefill chunk"
    )
    assert any(decodes < seqs and not fresh for decodes, seqs, fresh in batches), (
        "no prefill after cached context"
    )
    decode_batches = {decodes for decodes, seqs, _ in batches if decodes == seqs}
    assert 1 in decode_batches and max(decode_batches) >= 4
    new = sorted(describe(k) for k in later - warm)
    assert not new, "variants compiled after the warm-up:\n" + "\n".join(new)
    assert compiled_variant_counts() == compiled


def test_variants_ignore_table_width_and_metadata_offsets():
    """Block-table widths and the offsets of sliced metadata change every step: none of them
    may pick a new variant (the batch's decodes are sliced off the front of the step's tensors)."""
    kv_heads, heads, head_dim, block_size = 2, 4, 32, 16
    pool = torch.randn(8, block_size, kv_heads, head_dim, device=DEVICE)
    with record_triton_variants() as seen:
        for width, skip in [(1, 0), (3, 1), (16, 2), (5, 3)]:
            tables = torch.zeros(skip + 2, width, dtype=torch.int32, device=DEVICE)
            seq_lens = torch.full((skip + 2,), width * block_size, dtype=torch.int32, device=DEVICE)
            q = torch.randn(skip + 2, heads, head_dim, device=DEVICE)
            triton_ops.paged_decode_attention(
                q[skip:], pool, pool, tables[skip:], seq_lens[skip:], 1.0, num_splits=1
            )
            starts = torch.arange(skip + 3, dtype=torch.int32, device=DEVICE)
            triton_ops.paged_prefill_attention(
                q, pool, pool, tables[skip:], starts[skip:], seq_lens[skip:], 1, 1.0
            )
            positions = torch.arange(skip + 2, device=DEVICE)[skip:]
            k = torch.randn(2, kv_heads, head_dim, device=DEVICE)
            fused_ops.rotary(positions, q[skip:], k, pool[0, :, 0], pool[0, :, 0])
            triton_ops.store_kvcache(
                k, k, pool, pool, torch.full((skip + 2,), -1, device=DEVICE)[skip:]
            )
    kernels = sorted(name for name, _, _ in seen)
    assert kernels == [
        "_decode_split_kernel",
        "_prefill_kernel",
        "_rotary_kernel",
        "_store_kvcache_kernel",
    ], "\n".join(sorted(describe(k) for k in seen))


def test_variant_key_follows_tritons_specialization_rules():
    """An int argument equal to 1 is a constant, and a pointer off 16-byte alignment is another
    binary: two launches of ``rms_norm`` that differ only so are three variants."""
    w = torch.ones(32, device=DEVICE)
    x = torch.randn(2, 4, 33, device=DEVICE)
    with record_triton_variants() as seen:
        fused_ops.rms_norm(x[:, :, :32], w, 1e-6)  # n_heads 4
        fused_ops.rms_norm(x[:, :1, :32], w, 1e-6)  # n_heads 1
        fused_ops.rms_norm(x[:, :, 1:], w, 1e-6)  # x 4 bytes off alignment
        fused_ops.rms_norm(x[:1, :, :32], w, 1e-6)  # n_rows is not specialized: same as the first
    assert len(seen) == 3


def test_the_full_batch_warm_up_leaves_no_trace(path):
    """On CUDA ``LLMEngine`` runs a full batch of throw-away requests at start-up (what a first
    ``generate`` paid over the second); nothing of it may show in what users get."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11]]
    with LLM(
        path, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128
    ) as llm:
        expected = llm.generate(prompts, params, use_tqdm=False)
        llm.reset_prefix_cache()
        engine = llm.engine
        engine._warm_up_full_batch()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert engine.num_generated_tokens == engine.scheduler.prefix_cache_queries == 0
        assert not engine.sequences and not engine.output_processor.requests
        again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
    assert [o.num_cached_tokens for o in again] == [0, 0]
