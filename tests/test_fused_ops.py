"""Fused Triton RMSNorm / RoPE / SiLU-and-mul / logprobs / sampling against plain PyTorch.

Without a GPU the kernels run under the Triton interpreter (set before triton is imported) on
small shapes in fp32 and fp16; on a GPU the same tests run compiled, add bf16, and check that
the layers dispatch to the fused kernels.
"""

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from grids import kernel_grid  # noqa: E402

from vllm_lite.layers import fused_ops  # noqa: E402
from vllm_lite.layers.activation import SiluAndMul  # noqa: E402
from vllm_lite.layers.fused_ops import gumbel_sample, rms_norm, rotary, silu_and_mul, token_logprobs  # noqa: E402
from vllm_lite.layers.norm import RMSNorm  # noqa: E402
from vllm_lite.layers.rotary import RotaryEmbedding  # noqa: E402
from vllm_lite.worker.logprobs import token_logprobs_native  # noqa: E402
from vllm_lite.worker.sampler import Sampler, SamplingBatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16 runs under the interpreter too and checks the 16-bit rounding order; bf16 only on a GPU,
# as triton 3.6's interpreter truncates fp32 -> bf16 casts instead of rounding them to nearest
DTYPE_VALUES = [torch.float32, torch.float16]
if torch.cuda.is_available():
    DTYPE_VALUES.append(torch.bfloat16)
TOKENS = [1, 37]  # 37: not a power of two, several row blocks
MAX_POS = 64


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        out, ref = out.float(), ref.float()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    """q, k as the model makes them: strided views of a split of one [T, (Hq + 2 Hkv) D] tensor."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(-1, num_q_heads, head_dim), k.view(-1, num_kv_heads, head_dim)


def make_norm(hidden: int, dtype) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-6, dtype=dtype).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5)
    return norm


# hidden 96: a row that does not fill its power-of-two block
@pytest.mark.parametrize("hidden,num_tokens,dtype", kernel_grid([64, 96], TOKENS, DTYPE_VALUES))
def test_rms_norm(num_tokens, hidden, dtype):
    norm = make_norm(hidden, dtype)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    assert_close(rms_norm(x, norm.weight, norm.eps), norm.forward_native(x))

    residual = torch.randn_like(x)
    x_before, res_before = x.clone(), residual.clone()
    out, new_res = rms_norm(x, norm.weight, norm.eps, residual)
    ref_out, ref_res = norm.forward_native(x, residual)
    assert_close(out, ref_out)
    assert torch.equal(new_res, ref_res)  # the sum is rounded once, exactly as torch rounds it
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)  # inputs untouched


@pytest.mark.parametrize("head_dim,num_tokens,dtype", kernel_grid([16, 64], TOKENS, DTYPE_VALUES))
def test_rms_norm_per_head_on_strided_views(num_tokens, head_dim, dtype):
    """Qwen3's q_norm / k_norm: over head_dim, on q and k straight from the qkv split."""
    q, k = qkv_views(num_tokens, 4, 2, head_dim, dtype)
    assert num_tokens == 1 or not q.is_contiguous()
    norm = make_norm(head_dim, dtype)
    for x in (q, k):
        out = rms_norm(x, norm.weight, norm.eps)
        assert out.is_contiguous()
        assert_close(out, norm.forward_native(x))


@pytest.mark.parametrize("head_dim,num_tokens,dtype", kernel_grid([16, 64], TOKENS, DTYPE_VALUES))
def test_rotary_on_strided_views(num_tokens, head_dim, dtype):
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, head_dim, MAX_POS).to(DEVICE)
    q, k = qkv_views(num_tokens, 4, 2, head_dim, dtype)
    q_before, k_before = q.clone(), k.clone()
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=DEVICE)
    q_out, k_out = rotary(positions, q, k, rope.cos, rope.sin)
    q_ref, k_ref = rope.forward_native(positions, q, k)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.parametrize("head_dim,num_tokens,dtype", kernel_grid([16, 128], TOKENS, DTYPE_VALUES))
def test_rotary_with_qk_norm_is_norm_then_rotary(num_tokens, head_dim, dtype):
    """Qwen3's per-head q/k RMSNorm inside the rotary kernel gives what the norm kernel and then
    the rotary kernel give, and what the plain torch layers give."""
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope = RotaryEmbedding(config, head_dim, MAX_POS).to(DEVICE)
    q_norm, k_norm = make_norm(head_dim, dtype), make_norm(head_dim, dtype)
    q, k = qkv_views(num_tokens, 16, 8, head_dim, dtype)
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=DEVICE)

    q_out, k_out = rotary(
        positions, q, k, rope.cos, rope.sin, (q_norm.weight, k_norm.weight), q_norm.eps
    )

    q_two, k_two = rotary(
        positions,
        rms_norm(q, q_norm.weight, q_norm.eps),
        rms_norm(k, k_norm.weight, k_norm.eps),
        rope.cos,
        rope.sin,
    )
    q_ref, k_ref = rope.forward_native(
        positions, q_norm.forward_native(q), k_norm.forward_native(k)
    )
    for out, two, ref in ((q_out, q_two, q_ref), (k_out, k_two, k_ref)):
        assert_close(out, two)
        assert_close(out, ref)
        if dtype != torch.float32:
            # the same roundings; only the fp32 sum of squares runs in another order, which can
            # move a normalized value by one unit in the last place (before the rotation mixes
            # two of them, so bound by the head's largest value)
            scale = two.float().abs().amax(dim=-1, keepdim=True)
            assert ((out.float() - two.float()).abs() <= scale * 2**-6).all()


# n 1500: more than one block per row, a ragged last one
@pytest.mark.parametrize("n,num_tokens,dtype", kernel_grid([32, 1500], TOKENS, DTYPE_VALUES))
def test_silu_and_mul(num_tokens, n, dtype):
    x = torch.randn(num_tokens, 2 * n, dtype=dtype, device=DEVICE) * 3
    assert_close(silu_and_mul(x), SiluAndMul().forward_native(x))


def assert_logprobs_match(logits, rows, tokens, k):
    token_lp, rank, top_lp, top_ids = token_logprobs(logits, rows, tokens, k)
    ref_lp, ref_rank, ref_top_lp, ref_top_ids = token_logprobs_native(logits, rows, tokens, k)
    torch.testing.assert_close(token_lp, ref_lp, rtol=0, atol=1e-5)
    assert torch.equal(rank, ref_rank)
    torch.testing.assert_close(top_lp, ref_top_lp, rtol=0, atol=1e-5)
    assert top_ids.dtype == ref_top_ids.dtype
    # equal logits may come in either order: the ids must name the reference's values
    chosen = torch.log_softmax(logits[rows].float(), -1).gather(1, top_ids)
    torch.testing.assert_close(chosen, ref_top_lp, rtol=0, atol=1e-5)
    assert all(len(set(r)) == k for r in top_ids.tolist())


# vocab: one short chunk; exactly one; three, the last ragged
@pytest.mark.parametrize("k,vocab,dtype", kernel_grid([0, 1, 5, 20], [7, 4096, 9001], DTYPE_VALUES))
def test_token_logprobs(vocab, k, dtype):
    logits = (torch.randn(6, vocab, device=DEVICE) * 4).to(dtype)
    rows = torch.tensor([4, 0, 4, 5], device=DEVICE)  # a subset, one row twice
    tokens = torch.randint(0, vocab, (4,), device=DEVICE)
    assert_logprobs_match(logits, rows, tokens, min(k, vocab))


def test_token_logprobs_counts_ties_in_the_rank():
    """Logits with many equal values: a token ties with others, some in other chunks."""
    logits = torch.randint(-3, 4, (3, 9001), device=DEVICE).float()
    rows = torch.tensor([0, 1, 2], device=DEVICE)
    tokens = torch.stack([(logits[i] == v).nonzero()[0, 0] for i, v in enumerate([3.0, 0.0, -3.0])])
    token_lp, rank, top_lp, _ = token_logprobs(logits, rows, tokens, 5)
    assert torch.equal(rank, (logits[rows] >= logits[rows, tokens][:, None]).sum(-1))
    torch.testing.assert_close(
        top_lp, token_logprobs_native(logits, rows, tokens, 5)[2], rtol=0, atol=1e-5
    )


def test_gumbel_sample_greedy_rows_take_the_first_argmax():
    """Temperature 0: torch's argmax, the lowest id among equal maxima, across chunks too."""
    logits = torch.randint(-3, 4, (4, 9001), device=DEVICE).float()
    logits[1, 5000] = logits[1, 8999] = 9.0  # the maximum twice, in chunks 1 and 2
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.0], device=DEVICE)
    tokens = gumbel_sample(logits, temperature, torch.arange(4, device=DEVICE))
    greedy = [0, 1, 3]
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    assert tokens[1] == 5000


def test_gumbel_sample_draws_from_the_tempered_softmax(monkeypatch):
    """300 rows of the same logits, one seed each: the frequencies match softmax(x / T) within
    4.5 standard errors (at T = 1 they would not); a -inf logit is never drawn. (One chunk of 256
    logits: the interpreter runs each program in Python; chunks meet in the other tests.)"""
    monkeypatch.setattr(fused_ops, "_SAMPLE_CHUNK", 256)
    n, vocab, temperature = 300, 200, 0.5
    ids = torch.tensor([3, 100, 199], device=DEVICE)
    row = torch.full((vocab,), float("-inf"), device=DEVICE)
    row[ids] = torch.tensor([2.0, 1.0, 0.0], device=DEVICE)
    tokens = gumbel_sample(
        row.expand(n, vocab),
        torch.full((n,), temperature, device=DEVICE),
        torch.arange(n, device=DEVICE) * 7919 + 1,
    )
    assert torch.isin(tokens, ids).all()
    p = torch.softmax(row[ids] / temperature, -1)
    freq = (tokens[:, None] == ids).float().mean(0)
    assert ((freq - p).abs() < 4.5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)


def test_gumbel_sample_depends_on_the_row_seed_only():
    """A row's token follows its seed and logits, not its place in the batch or the logits'
    dtype."""
    logits = torch.randn(6, 9001, device=DEVICE).to(torch.float16)
    temperature = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 0.8], device=DEVICE)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16], device=DEVICE)
    tokens = gumbel_sample(logits, temperature, seeds)
    order = torch.tensor([5, 3, 0, 4, 1, 2], device=DEVICE)
    assert torch.equal(
        gumbel_sample(logits[order], temperature[order], seeds[order]), tokens[order]
    )
    assert torch.equal(gumbel_sample(logits.float(), temperature, seeds), tokens)
    assert not torch.equal(gumbel_sample(logits, temperature, seeds + 1), tokens)


def sampling_batch(temperature, top_k, seeds):
    n = len(temperature)
    return SamplingBatch(
        temperature=torch.tensor(temperature, device=DEVICE),
        top_k=torch.tensor(top_k, device=DEVICE),
        top_p=torch.ones(n, device=DEVICE),
        min_p=torch.zeros(n, device=DEVICE),
        generators=[None if s is None else torch.Generator(DEVICE).manual_seed(s) for s in seeds],
        banned=[],
        all_greedy=False,
        any_top_k_top_p=any(k > 0 for k in top_k),
        any_min_p=False,
    )


def test_fused_draw_of_a_seeded_row_ignores_the_rest_of_the_batch():
    """A seeded row draws the same token alone and next to a top-k row (whose filter runs on
    the batch) and a greedy row; the top-k row draws from its k best tokens only."""
    logits = torch.randn(3, 300, device=DEVICE) * 3
    alone = Sampler._draw(logits[:1], sampling_batch([1.0], [0], [5]), None, fused=True)
    together = Sampler._draw(
        logits, sampling_batch([1.0, 1.0, 0.0], [0, 2, 0], [5, None, None]), None, fused=True
    )
    assert together[0] == alone[0]
    assert together[1] in logits[1].topk(2).indices and together[2] == logits[2].argmax()


def test_empty_inputs():
    x = torch.randn(0, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    assert rms_norm(x, w, 1e-6).shape == (0, 32)
    assert silu_and_mul(x).shape == (0, 16)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the layers use the fused kernels on CUDA only"
)
def test_layers_dispatch_to_fused_on_cuda():
    dtype = torch.bfloat16
    norm = make_norm(128, dtype)
    x, res = (
        torch.randn(7, 128, dtype=dtype, device=DEVICE),
        torch.randn(7, 128, dtype=dtype, device=DEVICE),
    )
    for got, want in zip(norm(x, res), rms_norm(x, norm.weight, norm.eps, res)):
        assert torch.equal(got, want)
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope = RotaryEmbedding(config, 128, MAX_POS).to(DEVICE)
    q, k = qkv_views(7, 16, 8, 128, dtype)
    positions = torch.arange(7, device=DEVICE)
    for got, want in zip(rope(positions, q, k), rotary(positions, q, k, rope.cos, rope.sin)):
        assert torch.equal(got, want)
    q_norm, k_norm = make_norm(128, dtype), make_norm(128, dtype)
    for got, want in zip(
        rope(positions, q, k, q_norm, k_norm),
        rotary(positions, q, k, rope.cos, rope.sin, (q_norm.weight, k_norm.weight), q_norm.eps),
    ):
        assert torch.equal(got, want)
    gu = torch.randn(7, 2 * 384, dtype=dtype, device=DEVICE)
    assert torch.equal(SiluAndMul()(gu), silu_and_mul(gu))


def test_layers_keep_plain_torch_on_cpu():
    """On CPU the layers' forward is exactly their plain PyTorch code."""
    norm = RMSNorm(32, dtype=torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x, res = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    ref = (x + res).float()
    ref = norm.weight * (ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + norm.eps)).to(
        torch.bfloat16
    )
    out, new_res = norm(x, res)
    assert torch.equal(out, ref) and torch.equal(new_res, x + res)
    gu = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(SiluAndMul()(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:])
