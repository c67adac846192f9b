"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE.
Each is ``llama.py``'s transformer (Qwen2-MoE with q/k/v bias, Qwen3-MoE with per-head q/k
RMSNorm) whose MLP is a ``SparseMoeBlock`` in the sparse layers and the dense SwiGLU in the
others. What differs between the three is read from the config in ``moe_spec``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_lite.layers.moe import SparseMoeBlock
from vllm_lite.models.llama import MLP, LlamaForCausalLM

# Config fields of other MoE families that change routing (DeepSeek's group-limited routing,
# sigmoid scores, scaled or biased weights, dense leading layers), with the value that means
# plain softmax top-k. A config that sets one otherwise is refused rather than misread.
ROUTING_NEUTRAL = {
    "scoring_func": "softmax",
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "n_shared_experts": 0,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "ep_size": 1,
}


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # rescale the top-k weights to sum to 1
    shared_expert_size: int  # 0: none
    sparse_layers: frozenset[int]  # the others keep the dense MLP of ``intermediate_size``


def moe_spec(config) -> MoESpec:
    """The MoE layout from an HF config (``mixtral``, ``qwen2_moe``, ``qwen3_moe``). Mixtral
    always renormalizes and has no dense layers; its ``router_jitter_noise`` acts in training
    only. The Qwen families follow ``norm_topk_prob``, ``decoder_sparse_step`` and
    ``mlp_only_layers`` as transformers does."""
    for field, neutral in ROUTING_NEUTRAL.items():
        value = getattr(config, field, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"config field {field}={value!r} changes expert routing in a way "
                f"this engine does not implement ({field}={neutral!r} or absent is)"
            )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r}: only silu (SwiGLU) experts run here")
    layers = range(config.num_hidden_layers)
    if config.model_type == "mixtral":
        spec = MoESpec(
            config.num_local_experts,
            config.num_experts_per_tok,
            config.intermediate_size,
            renormalize=True,
            shared_expert_size=0,
            sparse_layers=frozenset(layers),
        )
    elif config.model_type in ("qwen2_moe", "qwen3_moe"):
        step = config.decoder_sparse_step
        if step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
        dense = set(config.mlp_only_layers or [])
        sparse = frozenset(
            i for i in layers if i not in dense and config.num_experts > 0 and (i + 1) % step == 0
        )
        shared = config.shared_expert_intermediate_size if config.model_type == "qwen2_moe" else 0
        spec = MoESpec(
            config.num_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            bool(config.norm_topk_prob),
            shared,
            sparse,
        )
    else:
        raise ValueError(f"no mixture-of-experts layout known for model_type {config.model_type!r}")
    if spec.sparse_layers and not 1 <= spec.top_k <= spec.num_experts:
        raise ValueError(
            f"num_experts_per_tok ({spec.top_k}) must be between 1 and the number "
            f"of experts ({spec.num_experts})"
        )
    return spec


class MoEForCausalLM(LlamaForCausalLM):
    # checkpoint names: Mixtral's ``block_sparse_moe`` is our ``mlp``; per-expert tensors
    # (``experts.{e}.<name>``) or all experts fused (``experts.<name>``, transformers 5's own
    # layout) -> (our stacked parameter, part); everything else as in the dense models
    renamed_modules = {"block_sparse_moe": "mlp"}
    expert_modules = {
        "w1": ("w13", "gate"),
        "w3": ("w13", "up"),
        "w2": ("w2", "down"),
        "gate_proj": ("w13", "gate"),
        "up_proj": ("w13", "up"),
        "down_proj": ("w2", "down"),
        "gate_up_proj": ("w13", "gate_up"),
    }

    def __init__(self, config, dtype=torch.float32) -> None:
        spec = moe_spec(config)

        def mlp_of(layer: int):
            if layer not in spec.sparse_layers:
                return MLP(config, dtype)
            shared = None
            if spec.shared_expert_size:  # its partial sum joins the experts' in one all-reduce
                shared = MLP(config, dtype, spec.shared_expert_size, reduce=False)
            return SparseMoeBlock(
                config.hidden_size,
                spec.num_experts,
                spec.top_k,
                spec.intermediate_size,
                spec.renormalize,
                shared,
                dtype,
            )

        super().__init__(config, dtype, mlp_of)
        self.spec = spec
