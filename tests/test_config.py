import argparse
import subprocess
import sys

import pytest

from vllm_lite.config import EngineConfig, add_config_flags


def test_yaml_sections_fill_the_flat_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model_path: /m\ncache_config:\n  num_blocks: 7\n  block_size: 256\n"
        "scheduler_config:\n  max_num_seqs: 3\n"
    )
    config = EngineConfig.from_yaml(path)
    assert (config.model_path, config.num_blocks, config.block_size, config.max_num_seqs) == (
        "/m",
        7,
        256,
        3,
    )


def test_command_line_flags_override_yaml_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache_config:\n  block_size: 256\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    overrides = vars(parser.parse_args(["--block-size", "16", "--enforce-eager"]))
    config = EngineConfig.from_yaml(path, overrides=overrides)
    assert config.block_size == 16 and config.enforce_eager is True


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache_config:\n  num_blockz: 7\n")
    with pytest.raises(ValueError, match="num_blockz"):
        EngineConfig.from_yaml(path)
    with pytest.raises(ValueError, match="colour"):
        EngineConfig.from_dict({"colour": 1})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig.from_dict({"cache_config": {"block_size": "big"}})
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


def test_block_size_outside_1_to_256_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=512)


def test_main_rejects_unknown_config_key_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqz: 4\n")
    result = subprocess.run(
        [sys.executable, "main.py", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "max_num_seqz" in result.stderr


def test_prefix_caching_is_on_by_default_and_off_by_flag_or_yaml(tmp_path):
    assert EngineConfig().enable_prefix_caching is True
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert vars(parser.parse_args(["--no-enable-prefix-caching"])) == {
        "enable_prefix_caching": False
    }
    assert vars(parser.parse_args(["--enable-prefix-caching"])) == {"enable_prefix_caching": True}
    path = tmp_path / "c.yaml"
    path.write_text("cache_config:\n  enable_prefix_caching: false\n")
    assert EngineConfig.from_yaml(path).enable_prefix_caching is False
