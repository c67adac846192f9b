"""Command-line plumbing shared by ``main.py``, ``vllm-lite serve`` and ``vllm-lite bench``:
reading config.yaml under flag overrides, and turning a user's mistake (a bad flag, a bad config
value, a missing model folder) into one line on stderr and exit status 2 instead of a traceback.
Set ``VLLM_LITE_DEBUG=1`` to get the traceback anyway."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys

from vllm_lite.config import EngineConfig


def settle_heap() -> None:
    """Call once a long-running process has started, before its timed work: a server process
    before it serves, the serving benchmark's client before it sends. What start-up built
    (torch, transformers, the tokenizer, the app: ~400k objects) is frozen out of the garbage
    collector, and young collections wait for 10,000 new objects instead of 700. On the front
    end's event loop a full collection of that heap stalled every stream for ~250 ms, and
    collections took ~15% of its CPU (benchmarks/bench_front_end.py, VM, 2026-12-03); in the
    benchmark client, one stalled a run's reading for 67 ms (H200, serve_suite). vLLM freezes
    its heap too."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


@contextlib.contextmanager
def settled_heap():
    """``settle_heap`` for a while (the benchmark client's run), then the thresholds as they
    were and, unless something was frozen before, nothing frozen: the caller may be a
    long-lived process (a test session)."""
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    settle_heap()
    try:
        yield
    finally:
        if not frozen:
            gc.unfreeze()
        gc.set_threshold(*threshold)


def load_config(config_path: str, overrides: dict) -> EngineConfig:
    """config.yaml (or ``--config PATH``, which must exist) with the flags given on top."""
    if os.path.exists(config_path):
        return EngineConfig.from_yaml(config_path, overrides=overrides)
    if config_path != "config.yaml":
        raise ValueError(f"config file {config_path!r} not found")
    return EngineConfig(**overrides)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _argparse_error(self: argparse.ArgumentParser, message: str):
    self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


@contextlib.contextmanager
def one_line_errors(prog: str = "vllm-lite"):
    """Within: argparse errors print one line (no usage block); ValueError / FileNotFoundError
    (config validation, a missing model folder, a bad request) and ``SystemExit("message")``
    print ``PROG: error: message`` and exit with status 2."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if os.environ.get("VLLM_LITE_DEBUG"):
            raise
        message = str(exc)
        if isinstance(exc, FileNotFoundError) and message.startswith("model path"):
            message = f"config key 'model_path': {message}"
        print(f"{prog}: error: {_one_line(message)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except SystemExit as exc:
        if isinstance(exc.code, str):  # SystemExit("message") prints it and exits 1; make it 2
            print(f"{prog}: error: {_one_line(exc.code)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    finally:
        argparse.ArgumentParser.error = original
