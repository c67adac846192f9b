import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

from tiny_models import make_tiny_model

from benchmarks.__main__ import main, run_suite
from benchmarks.suites import SUITES, Row, bench


def fake_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_every_suite_row_runs_a_module_that_exists():
    modules = {row.module for rows in SUITES.values() for row in rows}
    missing = {m for m in modules if importlib.util.find_spec(m) is None}
    assert missing == set()


def test_a_row_prints_its_result_lines_as_a_table_row_and_logs_all_output(tmp_path, monkeypatch):
    fake_module(tmp_path, monkeypatch, "fake_bench", "print('warming up')\nprint('result: 42')\n")
    out = tmp_path / "out"
    row = Row("fake", "fake_bench", keep=r"^result", gpus=0)
    assert run_suite("demo", [row], str(out), None) == 0
    table = (out / "demo.md").read_text()
    assert "| fake | result: 42 |" in table
    assert "`python -m fake_bench`" in table
    assert "warming up" in (out / "demo" / "fake.log").read_text()


def test_a_row_past_its_time_bound_is_killed_and_reported_failed(tmp_path, monkeypatch):
    body = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"
    fake_module(tmp_path, monkeypatch, "slow_bench", body)
    rows = [Row("slow", "slow_bench", keep="x", timeout=1, gpus=0)]
    assert run_suite("demo", rows, str(tmp_path), None) == 1
    assert "FAILED (killed after 1 s): started" in (tmp_path / "demo.md").read_text()


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited


def test_a_signal_to_the_runner_kills_the_row_it_runs(tmp_path, monkeypatch):
    """A call's timeout kills the runner: the row's process (its own session) must die too,
    or its engine keeps the GPU for the next command."""
    body = (
        "import os, time\n"
        "open(os.environ['PID_FILE'], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    fake_module(tmp_path, monkeypatch, "stuck_bench", body)
    runner = (
        "from benchmarks import children\nfrom benchmarks.__main__ import run_suite\n"
        "from benchmarks.suites import Row\nchildren.kill_children_on_signals()\n"
        f"run_suite('demo', [Row('stuck', 'stuck_bench', keep='x', timeout=60, gpus=0)], "
        f"{str(tmp_path)!r}, None)\n"
    )
    repo = str(pathlib.Path(__file__).resolve().parent.parent)
    pid_file = tmp_path / "pid"
    env = dict(
        os.environ, PID_FILE=str(pid_file), PYTHONPATH=os.pathsep.join([str(tmp_path), repo])
    )
    proc = subprocess.Popen([sys.executable, "-c", runner], env=env, cwd=repo)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    row_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    while _alive(row_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(row_pid)


def test_a_row_needing_more_gpus_than_present_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.__main__.gpu_names", lambda: ["H200"])
    assert run_suite("demo", [Row("tp 2", "no_such_module", gpus=2)], str(tmp_path), None) == 0
    assert "tp 2" not in (tmp_path / "demo.md").read_text()


def test_shapes_flag_replaces_the_throughput_suites_shapes(capsys):
    assert main(["throughput", "--list", "--shapes", "mixtral-8x7b"]) == 0
    listed = capsys.readouterr().out
    assert "--model-config mixtral-8x7b" in listed and "--model-config qwen2.5-1.5b" not in listed


def test_a_throughput_row_reports_the_benchmarks_json_result(tmp_path):
    folder = make_tiny_model(str(tmp_path / "m"), "qwen3")
    flags = f"--model-config {folder} --num-prompts 3 --input-len 5 20 --output-len 2 6 --runs 1"
    row = bench("tiny", flags, gpus=0)
    assert run_suite("demo", [row], str(tmp_path), None) == 0
    cell = (tmp_path / "demo.md").read_text().splitlines()[-1].split(" | ")[1]
    assert "out tok/s" in cell and "median of 1; text on" in cell
