"""Which attention backend ``get_backend`` picks, and that a missing or unsuitable flash-attn
fails clearly. Runs everywhere: flash-attn is replaced by a stand-in module or hidden."""

import sys
import types

import pytest
import torch

from vllm_lite.attention import get_backend
from vllm_lite.attention.torch_ref import TorchRefBackend, paged_attention_ref

CUDA = torch.device("cuda")  # only compared against, never allocated on


def fake_flash_attn(with_block_table: bool = True) -> types.ModuleType:
    """A CPU stand-in for flash_attn with the documented semantics of the two functions the
    backend calls (causal mask aligned bottom-right, paged caches read through block_table)."""

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=None,
        causal=False,
        block_table=None,
    ):
        assert causal and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        if block_table is not None:  # k, v are the paged pool
            return paged_attention_ref(q, k, v, block_table, cu_seqlens_q, lens_k, softmax_scale)
        out, cq, ck = torch.empty_like(q), cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(lens_k)):  # k, v packed like q: each sequence's keys as one block
            one = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
            out[cq[i] : cq[i + 1]] = paged_attention_ref(
                q[cq[i] : cq[i + 1]],
                k[None, ck[i] : ck[i + 1]],
                v[None, ck[i] : ck[i + 1]],
                one,
                [0, cq[i + 1] - cq[i]],
                [lens_k[i]],
                softmax_scale,
            )
        return out

    def flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=None, block_table=None, softmax_scale=None, causal=False
    ):
        assert q.shape[1] == 1 and cache_seqlens.dtype == block_table.dtype == torch.int32
        qsl = list(range(q.shape[0] + 1))
        return paged_attention_ref(
            q.squeeze(1), k_cache, v_cache, block_table, qsl, cache_seqlens, softmax_scale
        ).unsqueeze(1)

    if not with_block_table:

        def flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,  # noqa: F811
            max_seqlen_k,
            softmax_scale=None,
            causal=False,
        ):
            raise AssertionError("not called")

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


def test_auto_on_cpu_is_torch_reference():
    assert isinstance(get_backend("auto", torch.device("cpu")), TorchRefBackend)
    assert isinstance(get_backend("auto", torch.device("cpu"), block_size=256), TorchRefBackend)


def test_missing_flash_attn_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` now fails
    with pytest.raises(ImportError, match="flash_attn"):
        get_backend("flash_attn", torch.device("cpu"))
    with pytest.raises(ImportError, match="flash_attn"):
        get_backend("flash_attn", CUDA, block_size=256)


def test_flash_attn_rejects_block_size_not_multiple_of_256():
    with pytest.raises(ValueError, match="256"):
        get_backend("flash_attn", CUDA, block_size=16)


def test_flash_attn_without_paged_varlen_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(with_block_table=False))
    with pytest.raises(ImportError, match="block_table"):
        get_backend("flash_attn", CUDA, block_size=256)


def test_auto_on_cuda_picks_flash_attn_only_when_usable(monkeypatch):
    pytest.importorskip("triton")
    from vllm_lite.attention.flash_attn_backend import FlashAttnBackend
    from vllm_lite.attention.triton_ops import TritonBackend

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert isinstance(get_backend("auto", CUDA, block_size=256), TritonBackend)
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    assert isinstance(get_backend("auto", CUDA, block_size=256), FlashAttnBackend)
    assert isinstance(get_backend("auto", CUDA, block_size=16), TritonBackend)
    assert isinstance(get_backend("auto", CUDA), TritonBackend)  # block size unknown


PLUMBING_CASES = {  # (cached, new, prefill_is_fresh): 2 decodes, then 2 chunks
    "cached_prefix": ([300, 20, 0, 256], [1, 1, 5, 7], False),
    "fresh": ([300, 20, 0, 0], [1, 1, 5, 7], True),
    "one_token_chunks": ([300, 20, 0, 256], [1, 1, 1, 1], False),
}


@pytest.mark.parametrize("case", list(PLUMBING_CASES))
def test_flash_attn_backend_plumbing_with_stand_in(monkeypatch, case):
    """The backend's row split, cu_seqlens and block-table slices, checked on CPU through the
    stand-in (the real kernels are covered by test_flash_attn_backend.py on a GPU)."""
    pytest.importorskip("triton")
    from vllm_lite.attention.flash_attn_backend import FlashAttnBackend
    from vllm_lite.attention.metadata import AttentionMetadata

    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    monkeypatch.setattr(FlashAttnBackend, "_check_inputs", staticmethod(lambda q, k_cache: None))
    bs, hq, hkv, d = 256, 4, 2, 16
    # the store kernel is Triton: the interpreter runs it on CPU tensors, a GPU on its own
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cached, new, fresh = PLUMBING_CASES[case]
    seq_lens = [c + n for c, n in zip(cached, new)]
    block_tables = torch.tensor([[3, 0], [5, 0], [1, 0], [4, 2]], dtype=torch.int32, device=dev)
    slots, qsl = [], [0]
    for i, (c, n) in enumerate(zip(cached, new)):
        slots += [int(block_tables[i, p // bs]) * bs + p % bs for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        torch.tensor(slots, device=dev),
        torch.tensor(qsl, dtype=torch.int32, device=dev),
        torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables,
        num_decodes=2,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        prefill_is_fresh=fresh,
    )
    torch.manual_seed(0)
    k_cache, v_cache = (torch.randn(6, bs, hkv, d, device=dev) for _ in range(2))
    q, k, v = (
        torch.randn(qsl[-1], hq, d, device=dev),
        torch.randn(qsl[-1], hkv, d, device=dev),
        torch.randn(qsl[-1], hkv, d, device=dev),
    )
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchRefBackend().forward(q, k, v, ref_k, ref_v, meta, 0.25)
    out = FlashAttnBackend(bs).forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
