import glob
import os

import torch
from tiny_models import HFReference, assert_same_greedy, make_tiny_model, prompts_of_lengths

from vllm_lite import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_sharded_bf16_checkpoint_loads_and_matches_transformers(tmp_path):
    path = make_tiny_model(str(tmp_path), "qwen2", dtype=torch.bfloat16, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 1
    hf = HFReference(path)  # upcast to fp32, as the engine is asked to
    llm = LLM(path, dtype="float32")
    for prompt in prompts_of_lengths([7, 30], 400):
        ours = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert_same_greedy(ours, hf.greedy(prompt, 16), prompt, hf)


def test_dtype_setting_chooses_the_compute_dtype(tmp_path):
    path = make_tiny_model(str(tmp_path), "llama")
    llm = LLM(path, dtype="bfloat16")
    assert llm.engine.runner.dtype == torch.bfloat16
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 16
