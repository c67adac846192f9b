"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy output equals transformers'
(fp32, the near-tie rule) on tiny models of odd shapes (``tiny_models.ARCHS``: 5, 6 and 7
experts, top-k 1 and 3, a dense layer among sparse ones, ``norm_topk_prob`` both ways, a gated
shared expert); checkpoints load from per-expert or fused expert tensors and in 1/tp slices;
what we do not implement is refused by name."""

import glob
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import HFReference, assert_same_greedy, make_tiny_model, prompts_of_lengths
from transformers import AutoConfig, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig

from vllm_lite import LLM, SamplingParams
from vllm_lite.layers.moe import SparseMoeBlock
from vllm_lite.models.loader import load_weights
from vllm_lite.models.moe import MoEForCausalLM, moe_spec
from vllm_lite.parallel_state import set_tp

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=MOE_ARCHS)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(str(tmp_path_factory.mktemp(request.param)), request.param)
    hf = HFReference(path)
    vocab = hf.model.config.vocab_size
    prompts = prompts_of_lengths([5, 17, 40, 2, 9], vocab)
    # two later requests sharing the third prompt's first 32 tokens (two blocks of 16)
    prompts += [prompts[2][:32] + p for p in prompts_of_lengths([3, 7], vocab, seed=1)]
    return path, hf, prompts, [hf.greedy(p, 16) for p in prompts]


def generate_and_check(llm, hf, prompts, refs):
    for prompt, out, ref in zip(prompts, llm.generate(prompts, GREEDY, use_tqdm=False), refs):
        assert_same_greedy(out.outputs[0].token_ids, ref, prompt, hf)


@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_matches_transformers_with_prefix_caching(tiny, block_size):
    path, hf, prompts, refs = tiny
    llm = LLM(path, dtype="float32", block_size=block_size, num_blocks=2048 // block_size)
    generate_and_check(llm, hf, prompts[:5], refs[:5])
    generate_and_check(llm, hf, prompts[5:], refs[5:])  # the shared prefix comes from the cache
    if block_size == 16:
        assert llm.engine.prefix_cache_hits >= 2 * 32
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_dummy_weights_generate_every_token(tiny):
    path, _, prompts, _ = tiny
    llm = LLM(path, load_format="dummy", num_blocks=64)
    outputs = llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16] * 3


@pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="tp 2 on CUDA needs 2 GPUs")
def test_tensor_parallel_2_equals_1_with_shared_expert_and_dense_layer(tmp_path):
    path = make_tiny_model(str(tmp_path), "qwen2_moe")
    prompts = prompts_of_lengths([5, 23, 40], 400)
    with LLM(path, num_blocks=64) as llm:
        one = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(path, tensor_parallel_size=2, num_blocks=64) as llm:
        two = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert two == one


def loaded_model(path: str, rank: int = 0, tp: int = 1) -> MoEForCausalLM:
    set_tp(rank, tp)
    try:
        model = MoEForCausalLM(AutoConfig.from_pretrained(path))
        load_weights(model, path)
    finally:
        set_tp(0, 1)
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_sharded_checkpoint_loads_the_same_weights_as_per_expert_tensors(tmp_path, arch):
    """transformers 5 writes experts fused (``save_original_format=False``) or per expert."""
    per_expert = make_tiny_model(str(tmp_path / "a"), arch)
    fused = make_tiny_model(
        str(tmp_path / "b"), arch, save_original_format=False, max_shard_size="40KB"
    )
    files = glob.glob(os.path.join(fused, "*.safetensors"))
    assert len(files) > 1
    assert any(name.endswith("experts.gate_up_proj") for f in files for name in load_file(f))
    full = loaded_model(per_expert).state_dict()
    assert full.keys() == loaded_model(fused).state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in loaded_model(fused).state_dict().items())
    # rank 1 of 2: the second half of every expert's gate, up and down intermediate dimension
    for path in (per_expert, fused):
        rank1 = loaded_model(path, rank=1, tp=2).model.layers[0].mlp.experts
        w13, w2 = full["model.layers.0.mlp.experts.w13"], full["model.layers.0.mlp.experts.w2"]
        n = w2.shape[2] // 2
        assert torch.equal(rank1.w13, torch.cat([w13[:, n : 2 * n], w13[:, 3 * n :]], dim=1))
        assert torch.equal(rank1.w2, w2[:, :, n:])


def test_a_checkpoint_missing_one_expert_is_refused_naming_it(tmp_path):
    path = make_tiny_model(str(tmp_path), "mixtral")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.w13.*\(2, 'up'\)"):
        loaded_model(path)


def test_a_routing_option_we_do_not_implement_is_refused_by_name(tmp_path):
    path = make_tiny_model(str(tmp_path), "qwen3_moe", n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="n_group=2"):
        LLM(path, num_blocks=16)
    config = Qwen3MoeConfig(num_experts=4, num_experts_per_tok=5, num_hidden_layers=1)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        moe_spec(config)


def test_dense_layers_are_where_transformers_puts_them():
    config = Qwen2MoeConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=16,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_hidden_layers=7,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=3,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    hf_sparse = {
        i
        for i, layer in enumerate(Qwen2MoeForCausalLM(config).model.layers)
        if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    }
    ours = {
        i
        for i, layer in enumerate(MoEForCausalLM(config).model.layers)
        if isinstance(layer.mlp, SparseMoeBlock)
    }
    assert ours == hf_sparse == {1, 5}
