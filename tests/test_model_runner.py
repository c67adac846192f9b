"""The model runner's own steps (those the engine does not schedule) are valid for every backend."""

import random
from types import SimpleNamespace

import numpy as np
import torch
from tiny_models import make_tiny_model
from transformers import AutoConfig

from vllm_lite.config import EngineConfig
from vllm_lite.engine.sequence import Sequence
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.batch import ScheduledBatch
from vllm_lite.worker.model_runner import BlockTableRows, ModelRunner


def test_warm_up_step_runs_through_the_triton_prefill_kernel(tmp_path):
    # fp32 prefill reads keys through the block table: a table narrower than the warm-up's
    # context sent the kernel into unrelated memory on the GPU (an illegal memory access)
    path = make_tiny_model(str(tmp_path), "llama")
    config = EngineConfig(
        model_path=path,
        dtype="float32",
        attention_backend="triton",
        block_size=4,
        max_num_batched_tokens=40,
        max_model_len=40,
    )
    runner = ModelRunner(config, AutoConfig.from_pretrained(path), path)
    step = runner.warm_up_step()
    assert step.block_tables.shape[1] * config.block_size >= step.max_seq_len
    assert torch.isfinite(runner.execute(step)).all()


def test_block_table_rows_give_each_step_its_sequences_tables_zero_padded():
    # rows persist between steps and copy only new blocks: check them against tables built from
    # scratch while tables grow, are replaced (a preempted sequence's new, shorter table), the
    # batch changes order and members, and the batch outgrows the rows
    rng = random.Random(0)
    rows = BlockTableRows(num_rows=4)
    seqs = [Sequence([1], SamplingParams()) for _ in range(12)]
    for _ in range(400):
        for seq in rng.sample(seqs, 4):
            if rng.random() < 0.2:
                seq.block_table = [
                    rng.randrange(1000) for _ in range(rng.randrange(4))
                ]  # free, or share
            else:
                seq.block_table.extend(
                    rng.randrange(1000) for _ in range(rng.randrange(3))
                )  # allocate
        live = [s for s in seqs if s.block_table]  # a scheduled sequence has a block
        batch = rng.sample(live, min(len(live), rng.randint(1, 6) if rng.random() < 0.9 else 12))
        if not batch:
            continue
        expected = np.zeros((len(batch), max(len(s.block_table) for s in batch)), np.int32)
        for i, seq in enumerate(batch):
            expected[i, : len(seq.block_table)] = seq.block_table
        got = rows.gather(batch)
        assert got.dtype == np.int32 and np.array_equal(got, expected)


def test_shared_prefix_is_the_most_common_first_blocks_rows_and_their_common_whole_blocks():
    runner = SimpleNamespace(block_size=4, cascade_min_seqs=2, cascade_min_tokens=8)

    def shared(tables, seq_lens):
        length, rows, blocks = ModelRunner.shared_prefix(
            runner, np.array(tables, np.int32), np.array(seq_lens)
        )
        return (
            length,
            None if rows is None else rows.tolist(),
            None if blocks is None else blocks.tolist(),
        )

    tables = [[7, 3, 9, 5, 1], [2, 3, 9, 6, 2], [7, 3, 9, 6, 8], [7, 3, 9, 5, 8]]
    assert shared(tables, [20] * 4) == (
        12,
        [1, 0, 1, 1],
        [7, 3, 9],
    )  # row 1 shares nothing; 4th blocks differ
    assert shared(tables, [20, 20, 13, 20]) == (
        12,
        [1, 0, 1, 1],
        [7, 3, 9],
    )  # 13 keys: the last in block 3
    # 12 keys: the last one in block 2, which this step writes (row 1's length does not count)
    assert shared(tables, [20, 5, 12, 20]) == (8, [1, 0, 1, 1], [7, 3])
    assert shared([[7, 3, 9], [7, 3, 9]], [11, 11]) == (8, [1, 1], [7, 3])
    assert shared([[7, 3, 9], [7, 4, 9]], [12, 12]) == (
        0,
        None,
        None,
    )  # one block: under cascade_min_tokens
    assert shared([[7, 3], [8, 3]], [9, 9]) == (
        0,
        None,
        None,
    )  # no first block twice: under cascade_min_seqs


def test_a_mixed_step_in_the_graph_layout_gives_the_eager_logits(tmp_path):
    # what a captured mixed step computes (padded tokens and sequence rows, decode lengths, the
    # prefill work list), run eagerly through the same Triton kernels on CPU
    path = make_tiny_model(str(tmp_path), "llama")
    hf_config = AutoConfig.from_pretrained(path)
    config = EngineConfig(
        model_path=path, dtype="float32", attention_backend="triton", block_size=4, max_model_len=64
    )
    runner = ModelRunner(config, hf_config, path)
    runner.allocate_kv_cache(64)
    torch.nn.init.normal_(runner.kv_cache)  # the cached contexts' keys and values
    rng = np.random.default_rng(0)
    blocks = iter(rng.permutation(64).tolist())
    seqs, counts = [], []
    for cached, new in [
        (9, 1),
        (20, 1),
        (10, 7),
        (0, 13),
    ]:  # 2 decodes, a chunk after a prefix, a prompt
        seq = Sequence(
            rng.integers(0, hf_config.vocab_size, cached + new).tolist(), SamplingParams()
        )
        seq.num_computed_tokens = cached
        seq.block_table = [next(blocks) for _ in range(-(-(cached + new) // 4))]
        seqs.append(seq)
        counts.append(new)
    step = runner.prepare(ScheduledBatch(seqs, counts))
    pool = runner.kv_cache.clone()
    eager = runner.execute(step)
    written, _ = runner.kv_cache.clone(), runner.kv_cache.copy_(pool)

    padded = runner.graph_layout(step, num_tokens=48, num_seqs=6)
    logits = runner.execute(padded)

    assert len(padded.input_ids) == 48 and len(padded.decode_lens) == 6
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(runner.kv_cache, written)  # the padding tokens wrote nothing


def test_a_step_with_prefill_tokens_takes_the_smallest_captured_size_that_holds_it():
    runner = SimpleNamespace(
        config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=8192),
        mixed_graphs={t: None for t in (16, 32, 64)},
        mixed_graph_max_tokens=2048,
    )
    runner.mixed_graph_seqs = lambda t: ModelRunner.mixed_graph_seqs(runner, t)

    def shape(num_tokens, num_seqs, num_decodes):
        step = SimpleNamespace(
            input_ids=np.zeros(num_tokens),
            seq_lens=np.zeros(num_seqs),
            num_decodes=num_decodes,
            prefill_work=None,
        )
        return ModelRunner.mixed_graph_shape(runner, step)

    assert shape(17, 3, 2) == (32, 4)  # 2 decodes + a 15-token chunk; sequence rows: max_num_seqs
    assert shape(16, 1, 0) == (16, 4)
    assert shape(65, 2, 1) is None  # larger than every graph: eager
    assert shape(3, 3, 3) is None  # decodes only: the decode graphs
    assert ModelRunner.mixed_graph_token_sizes(runner)[-3:] == [1536, 1792, 2048]
    runner.config.max_num_batched_tokens = 300
    assert ModelRunner.mixed_graph_token_sizes(runner) == [16, 32, 64, 128, 256]
