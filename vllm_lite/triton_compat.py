"""Imported by every module with Triton kernels: makes them run under triton 3.6's CPU
interpreter (``TRITON_INTERPRET=1``, how CI tests them) with a recent numpy. The interpreter
holds scalars as 1-element arrays and calls ``int()`` on them for a data-dependent ``range``,
which numpy 2.x refuses; index through ``.item()`` instead."""

from __future__ import annotations

import os

import numpy as np


def _fix_interpreter_scalar_index() -> None:
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        int(np.ones(1))
    except TypeError:
        _fix_interpreter_scalar_index()
