"""Command-line plumbing shared by ``main.py``, ``vllm-lite serve`` and ``vllm-lite bench``:
reading config.yaml under flag overrides, and turning a user's mistake (a bad flag, a bad config
value, a missing model folder) into one line on stderr and exit status 2 instead of a traceback.
Set ``VLLM_LITE_DEBUG=1`` to get the traceback anyway."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from vllm_lite.config import EngineConfig


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
