"""Engine configuration: one flat dataclass, filled from config.yaml, flags or ``LLM(**kwargs)``.

config.yaml may group keys under ``cache_config`` and ``scheduler_config`` as the seed does;
every key is also accepted at the top level. Unknown keys and wrong types are errors that name
the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, fields

import yaml

SECTIONS = {
    "cache_config": ("num_blocks", "block_size", "gpu_memory_utilization", "enable_prefix_caching"),
    "scheduler_config": ("max_num_seqs", "max_num_batched_tokens", "max_model_len"),
}
CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "load_format": ("auto", "dummy"),
    "attention_backend": ("auto", "torch", "triton", "flash_attn"),
}


@dataclass
class EngineConfig:
    model_path: str | None = None  # HF folder; None: the embedded SmolLM2-135M-Instruct
    tokenizer_path: str | None = None  # defaults to model_path
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's 16-bit dtype (or bf16) on CUDA
    device: str = "auto"
    load_format: str = "auto"  # dummy: random weights of the config's shape
    seed: int = 0
    # cache_config
    num_blocks: int | None = None  # None: as many as gpu_memory_utilization allows (CPU: 512)
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes already computed
    # scheduler_config
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # execution
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # no CUDA graphs
    attention_backend: str = "auto"
    trace: str | None = (
        None  # write a step trace here (JSON lines; .gz: gzipped) for `vllm-lite report`
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(EngineConfig)
        for f in fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ValueError(
                    f"config key {f.name!r}: expected {_type_name(hints[f.name])}, got {value!r}"
                )
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise ValueError(
                    f"config key {f.name!r}: must be one of {CHOICES[f.name]}, got {value!r}"
                )
        positive = ["block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"]
        positive += [k for k in ("num_blocks", "max_model_len") if getattr(self, k) is not None]
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r}: must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.block_size <= 256:
            raise ValueError(f"config key 'block_size': must be in 1..256, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                "config key 'gpu_memory_utilization': must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        flat: dict = {}
        for key, value in (data or {}).items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"config key {key!r}: expected a mapping, got {value!r}")
                for sub, sub_value in value.items():
                    if sub not in SECTIONS[key]:
                        raise ValueError(
                            f"unknown config key {key}.{sub!r}; allowed: {SECTIONS[key]}"
                        )
                    flat[sub] = sub_value
            elif key == "model":  # vLLM's spelling
                flat["model_path"] = value
            elif key in known:
                flat[key] = value
            else:
                raise ValueError(f"unknown config key {key!r}; known keys: {sorted(known)}")
        return cls(**flat)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict | None = None) -> EngineConfig:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        config = cls.from_dict(data)
        return dataclasses.replace(config, **(overrides or {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--key`` flag per config key (dashes or underscores), all defaulting to "not given"."""
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        flag_names = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
        if f.name == "model_path":
            flag_names.add("--model")
        base = _base_type(hints[f.name])
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
        parser.add_argument(*sorted(flag_names), **kwargs)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _type_ok(value, hint) -> bool:
    if value is None:
        return type(None) in typing.get_args(hint)
    base = _base_type(hint)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _type_name(hint) -> str:
    name = _base_type(hint).__name__
    return f"{name} or null" if type(None) in typing.get_args(hint) else name
