"""Tensor parallelism on CPU with gloo: greedy parity with one device (with preemption and chunked
prefill), weights split ~1/tp per rank, clean lifecycle (close, garbage collection, Ctrl-C,
parent death) and a clear, quick error when a worker fails."""

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from tiny_models import make_tiny_model, prompts_of_lengths, record_chunked_prefills

from vllm_lite import LLM, SamplingParams

# CPU: gloo. A GPU machine runs them on its GPUs (NCCL), which takes as many as the largest tp here.
pytestmark = pytest.mark.skipif(
    0 < torch.cuda.device_count() < 4, reason="tp 4 on CUDA needs 4 GPUs"
)
LENGTHS = [5, 17, 33, 2, 64, 9, 12, 40]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# 20 blocks of 8 tokens cannot hold all 8 sequences at once; 48 tokens a step chunks prompts.
SMALL_POOL = dict(block_size=8, num_blocks=20, max_num_batched_tokens=48)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(240)


# ---- process helpers ---------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def spawned_children() -> list[int]:
    """Live multiprocessing-spawned children of this process (the resource tracker excluded)."""
    if not os.path.isdir("/proc"):
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children()]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and "spawn_main" in cmdline and alive(int(entry)):
            found.append(int(entry))
    return found


def wait_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# ---- parity ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """arch -> (path, prompts, tp-1 greedy outputs, tp-1 parameter bytes)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path = make_tiny_model(str(tmp_path_factory.mktemp(arch)), arch)
            llm = LLM(path, **SMALL_POOL)
            prompts = prompts_of_lengths(LENGTHS, llm.engine.hf_config.vocab_size)
            outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            assert llm.engine.scheduler.num_preemptions > 0
            single = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
            cache[arch] = (path, prompts, outs, single)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("qwen2", 4)])
def test_greedy_matches_single_device_with_preemption_and_chunked_prefill(tiny_models, arch, tp):
    path, prompts, ref, single_bytes = tiny_models(arch)
    llm = LLM(path, tensor_parallel_size=tp, **SMALL_POOL)
    runner = llm.engine.runner
    pids = list(runner.worker_pids)
    assert len(pids) == tp - 1 and all(alive(p) for p in pids)
    chunked = record_chunked_prefills(llm.engine)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == ref
    assert llm.engine.scheduler.num_preemptions > 0
    assert chunked, "no prompt was prefilled in chunks"
    bm = llm.engine.block_manager
    assert bm.num_blocks == 20 and bm.num_free_blocks == bm.num_blocks

    # Weights: each rank holds about 1/tp of them (norms are replicated; with 2 KV heads at tp 4
    # each rank keeps a copy of one KV head, i.e. 1/2 of k/v).
    per_rank = runner.rank_weight_bytes
    print(
        f"\n{arch} weights: 1 device {single_bytes} B; tp {tp} per rank {per_rank} B "
        f"({max(per_rank) / single_bytes:.3f} of one device)"
    )
    assert len(per_rank) == tp
    assert max(per_rank) < {2: 0.6, 4: 0.35}[tp] * single_bytes

    llm.close()
    assert not wait_gone(pids, 5), "workers still alive after close()"
    assert not spawned_children()


def test_prefix_cache_hits_give_the_same_greedy_tokens_under_tensor_parallelism(tiny_models):
    path, prompts, ref, _ = tiny_models("llama")
    with LLM(
        path, tensor_parallel_size=2, **{**SMALL_POOL, "num_blocks": 64}
    ) as llm:  # room to keep them
        assert [
            o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)
        ] == ref
        hits = llm.engine.prefix_cache_hits
        again = llm.generate(
            prompts, GREEDY, use_tqdm=False
        )  # every prompt's full blocks are found
        assert [o.outputs[0].token_ids for o in again] == ref
        assert llm.engine.prefix_cache_hits > hits and any(o.num_cached_tokens for o in again)


def test_weights_split_per_rank_on_a_wider_model(tmp_path):
    """A model whose matrices dwarf the replicated norms: per-rank bytes are ~1/tp."""
    path = make_tiny_model(
        str(tmp_path),
        "qwen2",
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    config = dict(load_format="dummy", num_blocks=16)
    single = LLM(path, **config).engine.runner
    single_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
    print(f"\nweights: 1 device {single_bytes} B")
    for tp in (2, 4):
        with LLM(path, tensor_parallel_size=tp, **config) as llm:
            per_rank = llm.engine.runner.rank_weight_bytes
        shares = [round(b / single_bytes, 3) for b in per_rank]
        print(f"weights: tp {tp} per rank {per_rank} B ({shares})")
        assert len(per_rank) == tp
        assert all(0.9 / tp * single_bytes < b < 1.1 / tp * single_bytes for b in per_rank)


# ---- configuration errors -----------------------------------------------------------------------
def test_unsplittable_config_fails_before_any_process_starts(tmp_path):
    path = make_tiny_model(str(tmp_path), "llama", num_attention_heads=4, num_key_value_heads=2)
    before = set(spawned_children())
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size 3 .*num_attention_heads \(4\)"
    ) as info:
        LLM(path, tensor_parallel_size=3)
    assert "num_key_value_heads (2)" in str(info.value) and "intermediate_size (128)" in str(
        info.value
    )
    assert set(spawned_children()) == before


# ---- failures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_path(tiny_models):
    return tiny_models("llama")[0]


def test_killing_a_worker_mid_run_is_a_quick_clear_error(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, num_blocks=256, block_size=8)
    pid = llm.engine.runner.worker_pids[0]
    killed_at = []

    def kill():
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(1.0, kill)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    timer.start()
    deadline = time.monotonic() + 60
    with pytest.raises(
        RuntimeError, match=r"rank 1 died unexpectedly \(killed by signal SIGKILL\)"
    ):
        while time.monotonic() < deadline:
            llm.generate(prompts_of_lengths([20, 30, 40, 50], 400), long, use_tqdm=False)
    took = time.monotonic() - killed_at[0]
    print(f"\nerror {took:.2f} s after the kill")
    assert took < 10
    assert not alive(pid) and not spawned_children()
    with pytest.raises(RuntimeError, match="rank 1"):  # the engine stays failed, clearly
        llm.engine.step() if llm.engine.has_unfinished_requests() else llm.engine.runner.execute(
            None
        )
    llm.close()


def test_a_worker_exception_reaches_the_user_with_rank_and_traceback(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, num_blocks=64, block_size=8)
    pid = llm.engine.runner.worker_pids[0]
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.engine.runner._workers.commands[0].send(("step", None))  # rank 1 now fails inside execute
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed: AttributeError.*Traceback") as info:
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    assert "NoneType" in str(info.value)  # the cause, from the worker's own traceback
    assert not wait_gone([pid], 5) and not spawned_children()
    llm.close()


def test_a_hung_worker_is_an_error_after_the_timeout_not_a_hang(llama_path, monkeypatch):
    monkeypatch.setenv("VLLM_LITE_TP_TIMEOUT", "3")
    llm = LLM(llama_path, tensor_parallel_size=2, num_blocks=64, block_size=8)
    pid = llm.engine.runner.worker_pids[0]
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    os.kill(pid, signal.SIGSTOP)  # alive, but never answers
    start = time.monotonic()
    try:
        with pytest.raises(
            RuntimeError, match=r"rank 0 failed: .*(?i:time).*VLLM_LITE_TP_TIMEOUT=3"
        ):
            llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 15
        assert not wait_gone([pid], 5) and not spawned_children()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    llm.close()


# ---- lifecycle --------------------------------------------------------------------------------
def test_close_and_garbage_collection_leave_no_process(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, num_blocks=64)
    pids = list(llm.engine.runner.worker_pids)
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.close()
    llm.close()  # idempotent
    assert not wait_gone(pids, 5)
    with pytest.raises(RuntimeError, match="closed"):
        llm.engine.runner.execute(None)

    llm = LLM(
        llama_path, tensor_parallel_size=2, num_blocks=64
    )  # a fresh group in the same process
    pids = list(llm.engine.runner.worker_pids)
    llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    assert not wait_gone(pids, 10), "a garbage-collected LLM left its workers behind"
    assert not spawned_children()


CHILD_SCRIPT = """
import json, os, signal, sys
from vllm_lite import LLM, SamplingParams


def ctrl_c_at_next_call(owner, name):
    # What a terminal's Ctrl-C does (SIGINT to the whole process group), timed to land here.
    original = getattr(owner, name)

    def pressed(*args, **kwargs):
        setattr(owner, name, original)
        os.killpg(0, signal.SIGINT)
        return original(*args, **kwargs)

    setattr(owner, name, pressed)


if __name__ == "__main__":
    model, then = sys.argv[1:]
    llm = LLM(model, tensor_parallel_size=2, num_blocks=256, block_size=8)
    print(json.dumps({"workers": llm.engine.runner.worker_pids}), flush=True)
    prompts = [[5, 6, 7] * 10] * 4
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    if then == "exit":  # the end of a script that never calls close()
        sys.exit(0)
    if then == "ctrl-c-in-a-collective":  # rank 0 leaves mid-step; rank 1 waits in the collective
        import torch.distributed as dist
        ctrl_c_at_next_call(dist, "all_reduce")
    elif then == "ctrl-c-between-steps":  # in the engine's own code: the workers are idle
        ctrl_c_at_next_call(llm.engine.scheduler, "schedule")
    print("generating", flush=True)
    while True:
        llm.generate(prompts, params, use_tqdm=False)
"""
LEAK_WARNING = "leaked semaphore"  # multiprocessing's resource tracker, cleaning up after a process


@contextlib.contextmanager
def engine_process(tmp_path, model_path, then: str):
    """(process, worker pids) of CHILD_SCRIPT run in its own session, as from a terminal; whatever
    outlives the test is killed."""
    script = tmp_path / "engine_child.py"
    script.write_text(textwrap.dedent(CHILD_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, str(script), model_path, then],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    workers = []
    try:
        line = proc.stdout.readline()
        assert line, f"engine process failed to start:\n{proc.stderr.read()}"
        workers = json.loads(line)["workers"]
        yield proc, workers
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def stderr_once_all_gone(proc, workers) -> str:
    """The engine process's stderr, read to its end: the workers and its resource tracker share it,
    so this returns once they have all exited (the tracker reports leaks as it exits)."""
    assert not wait_gone(workers, 10), f"workers {workers} outlived the engine process"
    return proc.stderr.read()


@pytest.mark.parametrize("where", ["in-a-collective", "between-steps"])
def test_ctrl_c_stops_the_engine_and_its_workers_promptly_and_cleanly(tmp_path, llama_path, where):
    with engine_process(tmp_path, llama_path, f"ctrl-c-{where}") as (proc, workers):
        assert proc.stdout.readline() == "generating\n"
        start = time.monotonic()
        rc = proc.wait(timeout=20)
        print(f"\nexited {time.monotonic() - start:.2f} s after Ctrl-C ({where})")
        err = stderr_once_all_gone(proc, workers)
        assert rc != 0 and "KeyboardInterrupt" in err
        assert LEAK_WARNING not in err, err


def test_a_script_that_ends_without_close_exits_promptly_and_cleanly(tmp_path, llama_path):
    with engine_process(tmp_path, llama_path, "exit") as (proc, workers):
        rc = proc.wait(timeout=20)
        err = stderr_once_all_gone(proc, workers)
        assert rc == 0, err
        assert LEAK_WARNING not in err, err


def test_workers_exit_when_the_engine_process_is_killed(tmp_path, llama_path):
    with engine_process(tmp_path, llama_path, "generate") as (proc, workers):
        assert proc.stdout.readline() == "generating\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # Nothing of ours relies on the engine's own cleanup: no semaphore is left behind.
        assert LEAK_WARNING not in stderr_once_all_gone(proc, workers)
