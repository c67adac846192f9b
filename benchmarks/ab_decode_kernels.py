"""A/B of the paged decode kernels of two versions of ``triton_ops`` in one process (GPU only):
today's module against an older copy given by path, on the batches of ``bench_decode_splits``
(256 sequences, contexts 100..1600, four KV layouts, heuristic splits and one split) and of
``bench_decode_configs --shared-prefix`` (cascade). Old and new alternate, 5 rounds, median of
``triton.testing.do_bench`` medians.

    python -m benchmarks.ab_decode_kernels --old /path/to/old/triton_ops.py
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics

import triton

from benchmarks.bench_decode_configs import shared_batch
from benchmarks.bench_decode_splits import HEAD_DIM, SHAPES, mixed_batch
from vllm_lite.attention import triton_ops


def load(path: str):
    spec = importlib.util.spec_from_file_location("old_triton_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ab(name: str, kv_bytes: int, calls: dict) -> None:
    """calls: label -> zero-argument launch; prints each one's median time and GB/s of K/V."""
    times = {label: [] for label in calls}
    outs = {label: fn() for label, fn in calls.items()}
    first = next(iter(outs.values())).float()
    errs = {label: ((o.float() - first).norm() / first.norm()).item() for label, o in outs.items()}
    for _ in range(5):
        for label, fn in calls.items():
            times[label].append(triton.testing.do_bench(fn, return_mode="median"))
    cells = [f"{label} {statistics.median(t) * 1e3:6.1f} us ({kv_bytes / statistics.median(t) / 1e6:5.0f} GB/s, "
             f"{min(t) * 1e3:.1f}..{max(t) * 1e3:.1f}, diff {errs[label]:.0e})" for label, t in times.items()]
    print(f"{name}: " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True, help="path of the older triton_ops.py")
    old = load(parser.parse_args().old)
    scale = HEAD_DIM ** -0.5
    for name, (heads, kv_heads) in SHAPES.items():
        q, k, v, tables, seq_lens, kv_bytes = mixed_batch(heads, kv_heads)
        for splits in (None, 1):
            ab(f"{name} splits {splits or 'auto'}", kv_bytes, {
                label: (lambda m=m: m.paged_decode_attention(q, k, v, tables, seq_lens, scale, num_splits=splits,
                                                               max_seq_len=int(seq_lens.max())))
                for label, m in (("old", old), ("new", triton_ops))})
    q, k, v, tables, seq_lens, shared, kv_bytes = shared_batch()
    ab("cascade (shared 1,024 + own 128..256, 8 rows not sharing)", kv_bytes, {
        label: (lambda m=m: m.paged_decode_attention(q, k, v, tables, seq_lens, scale, shared=shared))
        for label, m in (("old", old), ("new", triton_ops))})


if __name__ == "__main__":
    main()
