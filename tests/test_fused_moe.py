"""The fused MoE Triton path (alignment, grouped GEMMs, the sum over k) against the torch
reference ``fused_experts_torch``.

Without a GPU the kernels run under the Triton interpreter on tiny shapes in fp32 and fp16; on
a GPU the same tests run compiled, add bf16, CUDA-graph capture and the dispatch.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_lite.layers import fused_moe  # noqa: E402
from vllm_lite.layers.fused_moe import (  # noqa: E402
    GemmConfig,
    MoEConfig,
    align_assignments,
    fused_experts,
    fused_experts_torch,
    fused_experts_triton,
    warm_up_fused_moe,
)
from vllm_lite.worker.triton_variants import describe, record_triton_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
# bf16 only on a GPU: triton 3.6's interpreter truncates fp32 -> bf16 casts instead of rounding
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=CUDA_ONLY)]
# 32-wide tiles: hidden/intermediate 48 leave a partial K block and wrapped columns
SMALL_TILES = MoEConfig(16, GemmConfig(32, 32, 2, 4, 2), GemmConfig(32, 32, 2, 4, 2))


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0):
    """k distinct experts per token and softmax weights over them, as a router gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    weights = torch.rand(num_tokens, top_k, generator=g).softmax(dim=1)
    return weights.to(DEVICE), ids.to(DEVICE)


def make_experts(num_experts: int, hidden: int, inter: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        out, ref = out.float(), ref.float()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize(
    "num_experts, top_k, num_tokens, block_m",
    [
        (5, 3, 33, 16),  # 99 assignments: two alignment chunks
        (6, 2, 7, 16),
        (6, 1, 1, 32),  # five experts get nothing
    ],
)
def test_alignment_puts_each_assignment_once_in_its_experts_padded_run(
    num_experts, top_k, num_tokens, block_m
):
    _, ids = random_routing(num_tokens, num_experts, top_k)
    sorted_ids, bounds = align_assignments(ids, num_experts, block_m)
    sorted_ids, bounds, flat = sorted_ids.cpu(), bounds.cpu().tolist(), ids.reshape(-1).cpu()
    num_assign = flat.numel()
    # the static bound: at most min(experts, assignments) runs, each padded by < BLOCK_M
    assert len(sorted_ids) == num_assign + min(num_experts, num_assign) * (block_m - 1)
    assert bounds[0] == 0
    for e in range(num_experts):
        run = sorted_ids[bounds[e] : bounds[e + 1]]
        mine = (flat == e).nonzero().squeeze(1)
        assert len(run) == -(-len(mine) // block_m) * block_m  # padded to BLOCK_M, no more
        assert torch.equal(run[: len(mine)], mine.to(run.dtype))  # every one, in order
        assert (run[len(mine) :] == num_assign).all()  # the sentinel in the padding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_experts, top_k, num_tokens, hidden, inter, config",
    [
        (5, 1, 1, 32, 48, None),  # the default config's tiles
        (6, 2, 7, 48, 32, SMALL_TILES),
        (5, 3, 33, 32, 48, None),
        (5, 3, 20, 48, 48, SMALL_TILES),
    ],
)
def test_fused_experts_triton_matches_reference(
    num_experts, top_k, num_tokens, hidden, inter, dtype, config
):
    w13, w2 = make_experts(num_experts, hidden, inter, dtype)
    weights, ids = random_routing(num_tokens, num_experts, top_k)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1))
    x = x.to(DEVICE, dtype)
    out = fused_experts_triton(x, w13, w2, weights, ids, config)
    assert_close(out, fused_experts_torch(x, w13, w2, weights, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_expert_taking_every_token_spans_several_row_blocks(dtype):
    """40 tokens to expert 2 (three 16-row blocks, the last one partial), experts 0, 1, 3 idle."""
    w13, w2 = make_experts(4, 32, 32, dtype)
    ids = torch.full((40, 1), 2, device=DEVICE)
    weights = torch.rand(40, 1, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    assert_close(
        fused_experts_triton(x, w13, w2, weights, ids, SMALL_TILES),
        fused_experts_torch(x, w13, w2, weights, ids),
    )


@pytest.mark.parametrize(
    "num_experts, num_tokens, block_m", [(4, 16, 16), (4, 40, 32), (8, 130, 64), (4, 100, 128)]
)
def test_default_config_of_each_row_block_size_matches_reference(num_experts, num_tokens, block_m):
    config = fused_moe.get_config(num_experts, 32, 32, 2, num_tokens, torch.float32)
    assert config.block_m == block_m
    w13, w2 = make_experts(num_experts, 32, 32, torch.float32)
    weights, ids = random_routing(num_tokens, num_experts, 2)
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert_close(
        fused_experts_triton(x, w13, w2, weights, ids),
        fused_experts_torch(x, w13, w2, weights, ids),
    )


def test_tuned_table_entry_serves_its_token_bucket(monkeypatch):
    entry = (32, (64, 128, 4, 4, 3), (128, 64, 8, 8, 4))
    monkeypatch.setitem(fused_moe.TUNED_CONFIGS, (8, 64, 32, 64), entry)
    cfg = fused_moe.get_config(8, 64, 32, 2, 40, torch.bfloat16)  # 40 tokens: bucket 64
    assert cfg == MoEConfig(32, GemmConfig(64, 128, 4, 4, 3), GemmConfig(128, 64, 8, 8, 4))
    assert fused_moe.get_config(8, 64, 32, 2, 65, torch.bfloat16) != cfg  # bucket 256: the default


def test_warm_up_compiles_every_token_buckets_kernels(monkeypatch):
    monkeypatch.setattr(fused_moe, "_seen_shapes", {})
    w13, w2 = make_experts(4, 32, 32, torch.float32)
    x = torch.randn(100, 32, device=DEVICE)
    weights, ids = random_routing(100, 4, 2)
    fused_experts_triton(x[:2], w13, w2, weights[:2], ids[:2])  # what a model's forward does first
    with record_triton_variants() as warm:
        warm_up_fused_moe(max_tokens=100)
    with record_triton_variants() as later:
        for n in (1, 5, 17, 65, 100):
            fused_experts_triton(x[:n], w13, w2, weights[:n], ids[:n])
    new = sorted(describe(k) for k in later - warm)
    assert not new, "variants compiled after the warm-up:\n" + "\n".join(new)


@CUDA_ONLY
def test_fused_experts_dispatches_to_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(fused_moe, "fused_experts_torch", None)  # the reference may not run
    w13, w2 = make_experts(6, 64, 64, torch.bfloat16)
    weights, ids = random_routing(5, 6, 2)
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    assert fused_experts(x, w13, w2, weights, ids).shape == (5, 64)


@CUDA_ONLY
def test_fused_experts_replays_in_a_cuda_graph_bit_for_bit():
    w13, w2 = make_experts(6, 64, 64, torch.bfloat16)
    weights, ids = random_routing(16, 6, 2)
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)
    eager = fused_experts(x, w13, w2, weights, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    new_weights, new_ids = random_routing(16, 6, 2, seed=5)  # new routing, same buffers
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, fused_experts(x, w13, w2, weights, ids))
    assert not torch.equal(out, eager)
