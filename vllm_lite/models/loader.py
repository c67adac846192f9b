"""Load HuggingFace safetensors (single file or sharded) straight into our parameters: the only
translation is the packed q/k/v and gate/up names. The ``weight_loader`` of the module that owns
a parameter reads just this rank's slice of the tensor from disk."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn


def _checkpoint_files(model_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return files


def load_weights(model: nn.Module, model_path: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for file in _checkpoint_files(model_path):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                if "rotary_emb.inv_freq" in name:
                    continue
                if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                    continue
                target, shard_id = name, None
                for ckpt_part, (our_part, sid) in packed.items():
                    if f".{ckpt_part}." in name:
                        target, shard_id = name.replace(ckpt_part, our_part), sid
                        break
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
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
