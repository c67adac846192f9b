import json
import random

import pytest
from tiny_models import make_tiny_model
from transformers import AutoConfig

from vllm_lite.default_model import default_model_path
from vllm_lite.entrypoints.benchmark import (
    WeightBytes,
    Workload,
    bench_main,
    decode_floor_seconds,
    model_folder,
    text_tokenizer_for_shape,
    weight_and_kv_bytes,
)


def test_throughput_benchmark_generates_every_requested_token(tmp_path):
    folder = make_tiny_model(str(tmp_path / "m"), "qwen3")
    out = tmp_path / "result.json"
    bench_main(
        [
            "throughput",
            "--model-config",
            folder,
            "--num-prompts",
            "6",
            "--input-len",
            "5",
            "40",
            "--output-len",
            "2",
            "12",
            "--runs",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    work = Workload.random(6, (5, 40), (2, 12), 400, 0)
    assert result["output_tokens"] == sum(work.output_lens)
    assert result["input_tokens"] == sum(map(len, work.prompts))
    assert result["output_tokens_per_s"] > 0


def test_nano_vllm_dataset_runs_end_to_end_with_text_and_reports_every_run(tmp_path, capsys):
    folder = make_tiny_model(str(tmp_path / "m"), "llama")
    out = tmp_path / "result.json"
    bench_main(
        [
            "throughput",
            "--model-config",
            folder,
            "--dataset",
            "nano-vllm",
            "--num-prompts",
            "5",
            "--input-len",
            "4",
            "30",
            "--output-len",
            "2",
            "10",
            "--runs",
            "2",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    # nano-vllm's bench.py draws, scaled down (ids capped below the tiny vocabulary of 400)
    random.seed(0)
    prompts = [[random.randint(0, 399) for _ in range(random.randint(4, 30))] for _ in range(5)]
    max_tokens = [random.randint(2, 10) for _ in range(5)]
    assert result["input_tokens"] == sum(map(len, prompts)) and result["output_tokens"] == sum(
        max_tokens
    )
    assert result["temperature"] == 0.6 and result["text"] is True
    assert len(result["elapsed_s_runs"]) == 2
    assert (
        result["output_tokens_per_s_min"]
        <= result["output_tokens_per_s"]
        <= result["output_tokens_per_s_max"]
    )
    assert "text on" in capsys.readouterr().out


def test_shared_prefix_dataset_reuses_the_system_prompt_and_extras_sample_with_logprobs(tmp_path):
    folder = make_tiny_model(str(tmp_path / "m"), "llama")
    results = {}
    for caching in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        out = tmp_path / f"{caching}.json"
        bench_main(
            [
                "throughput",
                "--model-config",
                folder,
                "--dataset",
                "shared-prefix",
                "--num-prompts",
                "6",
                "--prefix-len",
                "48",
                "--input-len",
                "3",
                "9",
                "--output-len",
                "4",
                "4",
                "--runs",
                "1",
                "--max-num-batched-tokens",
                "64",
                "--sampling",
                "extras",
                caching,
                "--json",
                str(out),
            ]
        )
        results[caching] = json.loads(out.read_text())
    on, off = results["--enable-prefix-caching"], results["--no-enable-prefix-caching"]
    work = Workload.shared_prefix(6, 48, (3, 9), (4, 4), 400, 0)
    assert all(p[:48] == work.prompts[0][:48] for p in work.prompts)
    assert on["input_tokens"] == off["input_tokens"] == sum(map(len, work.prompts))
    # the first request computes the prefix (its 3 full blocks of 16); each later one reuses them
    assert on["prefix_cache_hit_tokens"] >= 48 and off["prefix_cache_hit_tokens"] == 0
    assert on["sampling"]["logprobs"] == 5 and on["prefix_caching"] and not off["prefix_caching"]


def test_nano_vllm_workload_is_nano_vllms_draws():
    work = Workload.nano_vllm(8)
    random.seed(0)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(8)
    ]
    max_tokens = [random.randint(100, 1024) for _ in range(8)]
    assert work.prompts == prompts and work.output_lens == max_tokens


def test_shapes_get_smollm2s_tokenizer_only_for_a_llama_of_its_vocabulary():
    assert (
        text_tokenizer_for_shape(AutoConfig.from_pretrained(model_folder("smollm2-135m")))
        == default_model_path()
    )
    assert (
        text_tokenizer_for_shape(AutoConfig.from_pretrained(model_folder("llama-3.2-1b"))) is None
    )
    assert text_tokenizer_for_shape(AutoConfig.from_pretrained(model_folder("qwen3-0.6b"))) is None


def test_benchmark_says_text_is_off_for_a_folder_without_a_tokenizer(tmp_path, capsys):
    make_tiny_model(str(tmp_path / "m"), "qwen3")
    config_only = tmp_path / "config.json"
    config_only.write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.warns(UserWarning, match="it is not used"):
        bench_main(
            [
                "throughput",
                "--model-config",
                str(config_only),
                "--num-prompts",
                "3",
                "--input-len",
                "4",
                "12",
                "--output-len",
                "2",
                "4",
                "--runs",
                "1",
            ]
        )
    assert "text OFF: token ids only" in capsys.readouterr().out


def test_decode_floor_counts_weights_every_step_and_live_kv():
    work = Workload(prompts=[[0] * 10, [0] * 20], output_lens=[1, 3])
    # step 0: both live (10 + 20 KV tokens); steps 1, 2: only the second (21, 22)
    expected = 3 * 100 + (30 + 21 + 22) * 2
    floor = decode_floor_seconds(work, WeightBytes(always=100), kv_per_token=2, bandwidth=1.0)
    assert floor == expected


def test_decode_floor_counts_the_experts_a_steps_tokens_touch():
    work = Workload(prompts=[[0] * 10, [0] * 20], output_lens=[1, 3])
    # 2 MoE layers of 4 experts, top-1: 2 tokens touch 4 x (1 - (3/4)^2) = 1.75 experts a layer
    weights = WeightBytes(always=100, per_expert=8, moe_layers=2, num_experts=4, top_k=1)
    expected = (100 + 2 * 1.75 * 8 + 30 * 2) + 2 * (100 + 2 * 1 * 8) + (21 + 22) * 2
    floor = decode_floor_seconds(work, weights, kv_per_token=2, bandwidth=1.0)
    assert floor == pytest.approx(expected)
    assert weights.total == 100 + 2 * 4 * 8


@pytest.mark.parametrize(
    "shape,billions", [("qwen3-30b-a3b", 30.5), ("mixtral-8x7b", 46.7), ("qwen1.5-moe-a2.7b", 14.3)]
)
def test_moe_shapes_count_the_weights_of_the_real_models(shape, billions):
    """The published parameter counts; norms are left out of the byte count (< 0.01%)."""
    weights, _ = weight_and_kv_bytes(AutoConfig.from_pretrained(model_folder(shape)))
    assert weights.total / 2 / 1e9 == pytest.approx(billions, rel=0.01)


def test_serving_peers_word_tokenizer_gives_back_exactly_the_ids_of_a_text():
    """serve_peer sends both servers text; ids like 200 must not split on a shorter word."""
    from benchmarks.serve_peer import word_tokenizer

    tokenizer = word_tokenizer(3000)
    ids = [2, 20, 200, 2000, 2999, 0, 7, 20, 1]
    text = tokenizer.decode(ids)
    assert text == "w2 w20 w200 w2000 w2999 w0 w7 w20 w1"
    assert tokenizer(text)["input_ids"] == ids


def test_structured_output_benchmark_makes_every_token_and_reports_compile_times(tmp_path, capsys):
    folder = make_tiny_model(str(tmp_path / "m"), "llama")
    out = tmp_path / "result.json"
    bench_main(
        [
            "throughput",
            "--model-config",
            folder,
            "--dataset",
            "nano-vllm",
            "--num-prompts",
            "4",
            "--input-len",
            "4",
            "20",
            "--output-len",
            "20",
            "40",
            "--runs",
            "1",
            "--structured-output",
            "json_schema",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    random.seed(0)
    [random.randint(0, 399) for _ in range(4) for _ in range(random.randint(4, 20))]
    # every request made its max_tokens: the schema never ends early
    assert result["output_tokens"] == sum(random.randint(20, 40) for _ in range(4))
    assert result["structured_output"] == "json_schema" and len(result["grammar_compile_s"]) == 9
    assert "compile per schema" in capsys.readouterr().out
