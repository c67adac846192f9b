"""Parameter grids of the kernel tests. On CUDA every combination of constexpr values is a
Triton compile of its own (about a second), so a full product of five axes costs minutes while
it checks the same code paths many times; there the tests take a set of combinations in which
every pair of values of any two axes occurs (pairwise covering: an error that needs two values
together is still met). The CPU interpreter compiles nothing and keeps the full product."""

from __future__ import annotations

import itertools

import torch


def pairwise(*axes: list) -> list[tuple]:
    """A small list of combinations of ``axes`` that holds every pair of values of every two
    axes (greedy: each step takes the combination that adds the most pairs not yet held)."""
    if len(axes) < 2:
        return list(itertools.product(*axes))
    combos = list(itertools.product(*(range(len(axis)) for axis in axes)))
    todo = {
        (a, i, b, j)
        for a, b in itertools.combinations(range(len(axes)), 2)
        for i in range(len(axes[a]))
        for j in range(len(axes[b]))
    }
    chosen = []
    while todo:

        def gain(c, todo=todo):
            return sum(
                (a, c[a], b, c[b]) in todo for a, b in itertools.combinations(range(len(c)), 2)
            )

        best = max(combos, key=gain)  # the first of the best: deterministic
        chosen.append(best)
        todo -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(best)), 2)}
    return [tuple(axis[i] for axis, i in zip(axes, c)) for c in chosen]


def kernel_grid(*axes: list) -> list[tuple]:
    """The combinations a kernel test runs: all of them under the CPU interpreter, a pairwise
    covering set on CUDA."""
    return pairwise(*axes) if torch.cuda.is_available() else list(itertools.product(*axes))
