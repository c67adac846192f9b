"""Load HuggingFace safetensors (single file or sharded) straight into our parameters: the only
translation is the packed q/k/v and gate/up names, and for mixture-of-experts models the experts'
tensors stacked into one parameter per layer. The ``weight_loader`` of the module that owns a
parameter reads just this rank's slice of the tensor from disk."""

from __future__ import annotations

import glob
import os
import re

import torch
from safetensors import safe_open
from torch import nn


def _checkpoint_files(model_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return files


# ``<layer>.experts.<e>.<name>[.weight]`` (one expert) or ``<layer>.experts.<name>`` (all, fused)
_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(?:(\d+)\.)?(\w+?)(?:\.weight)?$")


def target_of(model: nn.Module, name: str) -> tuple[str, object]:
    """Our parameter name for a checkpoint tensor, and the shard id its weight loader gets."""
    for ckpt_part, our_part in getattr(model, "renamed_modules", {}).items():
        name = name.replace(f".{ckpt_part}.", f".{our_part}.")
    experts = getattr(model, "expert_modules", None)
    match = _EXPERT_NAME.match(name) if experts else None
    if match and match.group(3) in experts:
        prefix, expert, part = match.groups()
        param, shard = experts[part]
        return f"{prefix}.{param}", (None if expert is None else int(expert), shard)
    for ckpt_part, (our_part, sid) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt_part}." in name:
            return name.replace(ckpt_part, our_part), sid
    return name, None


def load_weights(model: nn.Module, model_path: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in _checkpoint_files(model_path):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                if "rotary_emb.inv_freq" in name:
                    continue
                if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                    continue
                target, shard_id = target_of(model, name)
                if target not in params:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}"
                    )
                param = params[target]
                owner = model.get_submodule(target.rpartition(".")[0])
                loader = getattr(owner, "weight_loader", None)
                lazy = fh.get_slice(name)
                if loader is None:
                    param.data.copy_(lazy[:])
                else:
                    loader(param, lazy, shard_id) if shard_id is not None else loader(param, lazy)
                loaded.add(target)
    missing = {n for n in params if n not in loaded}
    if getattr(model, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    for name, param in params.items():  # stacked experts: every (expert, part) filled
        left = sorted(getattr(param, "missing_shards", ()))
        if left and name not in missing:
            missing.add(f"{name} (expert, part) {left[:3]}{' ...' if len(left) > 3 else ''}")
    if missing:
        raise ValueError(f"weights missing from {model_path}: {sorted(missing)[:5]}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shape, small enough that activations stay finite in bf16."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            gen = torch.Generator(device=param.device).manual_seed(seed * 100_003 + i)
            param.data.uniform_(-0.02, 0.02, generator=gen)
