"""Tiny random-weight HF models (with a small byte-level BPE tokenizer) saved as HF folders,
and the HF-transformers greedy reference the engine is checked against."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching mixes prefill and decode work in one step.",
    "Héllo wörld, naïve café, 東京, Ελληνικά, emoji 🙂 and more text.",
] * 20


def make_tokenizer(path: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(path)
    return fast


ARCHS = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "llama3_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    ),
    # mixtures of experts, with odd shapes: expert counts that are not powers of two, top-k of
    # 1 and 3, a dense layer among sparse ones, norm_topk_prob both ways
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            num_local_experts=5,
            num_experts_per_tok=3,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=3,
            intermediate_size=96,
            num_experts=6,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=7,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
}


def make_tiny_model(
    path: str,
    arch: str = "llama",
    dtype=torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    save_original_format: bool = True,
    **overrides,
) -> str:
    """Save a 2-layer random model of ``arch`` with the tiny tokenizer into ``path``.
    ``save_original_format=False``: transformers 5's own layout (MoE experts fused per layer)."""
    config_cls, model_cls, arch_kwargs = ARCHS[arch]
    tok = make_tokenizer(path)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    kwargs.update(arch_kwargs)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    model.save_pretrained(
        path,
        save_original_format=save_original_format,
        **({"max_shard_size": max_shard_size} if max_shard_size else {}),
    )
    return path


def prompts_of_lengths(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


class HFReference:
    """Greedy generation and logits from HF transformers, one prompt at a time (no padding)."""

    def __init__(self, path: str, dtype=torch.float32) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
        """``generate_kwargs``: transformers' logits processors, e.g. ``repetition_penalty=1.3``."""
        ids = torch.tensor([prompt])
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **generate_kwargs,
        )
        return out[0, len(prompt) :].tolist()

    @torch.no_grad()
    def next_token_logits(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens])).logits[0, -1].float()


def assert_same_greedy(
    ours: list[int], ref: list[int], prompt: list[int], hf: HFReference, process=None
) -> None:
    """Equal token for token, or a true near-tie at the first difference (< 1e-4 in fp32).
    ``process(logits, prompt, output so far)``: the logits processing both sides applied
    (penalties, bias), so the near-tie is judged on the logits the argmax saw."""
    if ours == ref:
        return
    n = min(len(ours), len(ref))
    first = next((i for i in range(n) if ours[i] != ref[i]), n)
    assert first < n, f"lengths differ: ours {len(ours)} vs reference {len(ref)}"
    logits = hf.next_token_logits(prompt + ref[:first])
    if process is not None:
        logits = process(logits, prompt, ref[:first])
    gap = abs(logits[ours[first]] - logits[ref[first]]).item()
    assert gap < 1e-4, (
        f"diverged at output position {first}: ours {ours[first]} vs reference {ref[first]}, "
        f"logit gap {gap:.3g} is no near-tie\n ours={ours}\n ref={ref}"
    )


def record_chunked_prefills(engine) -> list:
    """Wrap the engine's scheduler so that every prompt chunk shorter than the rest of its
    prompt is recorded; returns the (growing) list of such sequences."""
    chunked, schedule = [], engine.scheduler.schedule

    def spy():
        batch = schedule()
        chunked.extend(
            s
            for s, n in zip(batch.seqs, batch.num_new_tokens)
            if 1 < n < len(s) - s.num_computed_tokens
        )
        return batch

    engine.scheduler.schedule = spy
    return chunked


def random_block_tables(blocks_per_seq: list[int], spare: int = 2):
    """Block tables drawn from a random permutation of a pool with ``spare`` unused blocks, so
    every sequence is scattered. Returns (block_tables [num_seqs, max_blocks] int32, num_blocks)."""
    num_blocks = sum(blocks_per_seq) + spare
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    block_tables = torch.zeros(len(blocks_per_seq), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n]
        used += n
    return block_tables, num_blocks
