"""Which compiled variants of the engine's Triton kernels a run launches: a debugging aid for
cold start (a variant first met inside a user's request is compiled there, seconds on a GPU).

Triton compiles one binary per kernel and *specialization*: the constexpr values, the argument
dtypes, and for each integer argument not in ``do_not_specialize`` whether it is 1 (then it
becomes a constant) or divisible by 16, and for each pointer whether its address is divisible
by 16. ``variant_key`` computes that key with Triton's own binder
(``triton.runtime.jit.create_function_from_signature``, the code ``JITFunction.run`` calls before
its cache lookup), so it works under ``TRITON_INTERPRET=1`` on CPU tensors as well as on CUDA.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from triton.backends.compiler import BaseBackend
from triton.runtime.jit import KernelInterface, KernelParam, create_function_from_signature

_binders: dict[int, object] = {}


def engine_kernels() -> dict[str, KernelInterface]:
    """Every ``@triton.jit`` function of the engine, by name (device helpers included: never
    launched)."""
    from vllm_lite.attention import triton_ops
    from vllm_lite.layers import fused_moe, fused_ops

    return {
        name: obj
        for module in (triton_ops, fused_ops, fused_moe)
        for name, obj in vars(module).items()
        if isinstance(obj, KernelInterface)
    }


def _binder(kernel: KernelInterface):
    """Triton's argument binder for ``kernel``, with its ``do_not_specialize`` lists. The NVIDIA
    backend specializes ints and pointers exactly as ``BaseBackend`` does (it overrides neither)."""
    if id(kernel) not in _binders:
        options = getattr(kernel, "kwargs", None) or vars(
            kernel
        )  # InterpretedFunction keeps them in .kwargs
        no_spec = options.get("do_not_specialize") or []
        no_align = options.get("do_not_specialize_on_alignment") or []
        signature = inspect.signature(kernel.fn)
        params = [
            KernelParam(
                i, p, i in no_spec or p.name in no_spec, i in no_align or p.name in no_align
            )
            for i, p in enumerate(signature.parameters.values())
        ]
        _binders[id(kernel)] = create_function_from_signature(signature, params, BaseBackend)
    return _binders[id(kernel)]


def variant_key(name: str, kernel: KernelInterface, args: tuple, kwargs: dict) -> tuple:
    """(kernel name, per-argument specialization, launch options such as num_warps)."""
    _, specialization, options = _binder(kernel)(*args, **kwargs)
    return name, tuple(specialization), tuple(sorted(options.items()))


@contextlib.contextmanager
def record_triton_variants(seen: set | None = None) -> Iterator[set]:
    """Within the block, add the ``variant_key`` of every launch of an engine kernel to ``seen``
    (a new set if None), which it yields."""
    seen = set() if seen is None else seen
    kernels = engine_kernels()
    for name, kernel in kernels.items():

        def run(*args, _name=name, _kernel=kernel, _run=kernel.run, **kwargs):
            launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            seen.add(variant_key(_name, _kernel, args, launch_kwargs))
            return _run(*args, **kwargs)

        kernel.run = run  # fn[grid](...) looks ``run`` up on the instance at each launch
    try:
        yield seen
    finally:
        for kernel in kernels.values():
            del kernel.run


def describe(key: tuple) -> str:
    """One line per variant: the kernel, then each argument's specialization by name."""
    name, specialization, options = key
    kernel = engine_kernels()[name]
    parts = [
        f"{p}={s[1]!r}"
        if s[0] == "constexpr"
        else f"{p}:{s[0]}{'' if s[1] in (None, '') else '/' + s[1]}"
        for p, s in zip(inspect.signature(kernel.fn).parameters, specialization)
    ]
    opts = ",".join(f"{k}={v}" for k, v in options if k == "num_warps")
    return f"{name}({', '.join(parts)}){' ' + opts if opts else ''}"


def compiled_variant_counts() -> dict[str, int]:
    """Compiled (not interpreted) runs only: the binaries each kernel holds in Triton's in-process
    cache, the ground truth ``record_triton_variants`` mirrors."""
    return {
        name: sum(len(caches[0]) for caches in kernel.device_caches.values())
        for name, kernel in engine_kernels().items()
        if hasattr(kernel, "device_caches")
    }
