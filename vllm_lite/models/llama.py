"""The decoder-only transformer of Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k
RMSNorm): pre-norm blocks of GQA attention with RoPE and a SwiGLU MLP. Tensor parallel through
the layers it is built from; the attention backend is invisible here. The mixture-of-experts
models (``models/moe.py``) are this transformer with another MLP in some layers (``mlp_of``)."""

from __future__ import annotations

import torch
from torch import nn

from vllm_lite.attention import Attention
from vllm_lite.layers.activation import SiluAndMul
from vllm_lite.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_lite.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import RotaryEmbedding


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, dtype) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        # Qwen2 and Qwen2-MoE: bias on q/k/v only; attention_bias (Llama, Qwen3): on all four
        qkv_bias = (
            getattr(config, "attention_bias", False)
            or config.model_type == "qwen2"
            or getattr(config, "qkv_bias", False)
        )
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=qkv_bias,
            dtype=dtype,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        o_bias = getattr(config, "attention_bias", False) and config.model_type != "qwen2"
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias, dtype=dtype
        )
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k, *((self.q_norm, self.k_norm) if self.qk_norm else ()))
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    """SwiGLU; ``reduce=False`` leaves the tensor-parallel sum to the caller (a shared expert)."""

    def __init__(
        self, config, dtype, intermediate_size: int | None = None, reduce: bool = True
    ) -> None:
        super().__init__()
        bias, hidden = getattr(config, "mlp_bias", False), config.hidden_size
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [size] * 2, bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(size, hidden, bias=bias, dtype=dtype, reduce=reduce)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, dtype, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(config, rotary, dtype)
        self.mlp = mlp if mlp is not None else MLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype, mlp_of=None) -> None:
        """``mlp_of(layer index)``: that layer's MLP module (default: the dense SwiGLU)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rotary, dtype, mlp_of(i) if mlp_of else None)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our parameter name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, dtype=torch.float32, mlp_of=None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, mlp_of)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
