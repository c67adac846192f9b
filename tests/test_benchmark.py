import json

from tiny_models import make_tiny_model
from vllm_lite.benchmark import Workload, bench_main, decode_floor_seconds


def test_throughput_benchmark_generates_every_requested_token(tmp_path):
    folder = make_tiny_model(str(tmp_path / "m"), "qwen3")
    out = tmp_path / "result.json"
    bench_main(["throughput", "--model-config", folder, "--num-prompts", "6", "--input-len", "5", "40",
                "--output-len", "2", "12", "--json", str(out)])
    result = json.loads(out.read_text())
    work = Workload.random(6, (5, 40), (2, 12), 400, 0)
    assert result["output_tokens"] == sum(work.output_lens)
    assert result["input_tokens"] == sum(map(len, work.prompts))
    assert result["output_tokens_per_s"] > 0


def test_decode_floor_counts_weights_every_step_and_live_kv():
    work = Workload(prompts=[[0] * 10, [0] * 20], output_lens=[1, 3])
    # step 0: both live (10 + 20 KV tokens); steps 1, 2: only the second (21, 22)
    expected = 3 * 100 + (30 + 21 + 22) * 2
    assert decode_floor_seconds(work, weight_bytes=100, kv_per_token=2, bandwidth=1.0) == expected
