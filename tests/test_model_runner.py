"""The model runner's own steps (those the engine does not schedule) are valid for every backend."""
import torch
from transformers import AutoConfig

from tiny_models import make_tiny_model
from vllm_lite.config import EngineConfig
from vllm_lite.model_runner import ModelRunner


def test_warm_up_step_runs_through_the_triton_prefill_kernel(tmp_path):
    # fp32 prefill reads keys through the block table: a table narrower than the warm-up's
    # context sent the kernel into unrelated memory on the GPU (an illegal memory access)
    path = make_tiny_model(str(tmp_path), "llama")
    config = EngineConfig(model_path=path, dtype="float32", attention_backend="triton", block_size=4,
                          max_num_batched_tokens=40, max_model_len=40)
    runner = ModelRunner(config, AutoConfig.from_pretrained(path), path)
    step = runner.warm_up_step()
    assert step.block_tables.shape[1] * config.block_size >= step.max_seq_len
    assert torch.isfinite(runner.execute(step)).all()
