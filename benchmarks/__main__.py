"""Run benchmark suites: ``python -m benchmarks SUITE [SUITE ...]`` (``--list`` shows them).

Each row runs as its own process under its own time bound; its whole output goes to
``$OUT/<suite>/<row>.log`` (``$OUT`` defaults to ``/tmp/bench-out``), its result lines to the
screen as they come, and at the end every row is printed as a Markdown table row (also written
to ``$OUT/<suite>.md``) with the card, the date and the commit (``$COMMIT``, else ``git``).
On the GPU machine, ``bash benchmarks/run.sh SUITE`` installs carried wheels first.

    python -m benchmarks throughput                        # every shape of SHAPES
    python -m benchmarks throughput --shapes qwen3-0.6b    # some shapes only
    python -m benchmarks prefix --only "shared prefix, caching on"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from benchmarks import children
from benchmarks.suites import SUITES, Row, throughput_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "| row | result | card | date | commit | command |\n| --- | --- | --- | --- | --- | --- |"


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        check=False,
        capture_output=True,
        text=True,
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def card(names: list[str]) -> str:
    if not names:
        return "CPU"
    return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"


def commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def command(row: Row) -> list[str]:
    return [sys.executable, "-m", row.module, *row.args]


def shown(row: Row) -> str:
    """The command as a user types it."""
    head = "vllm-lite" if row.module == "vllm_lite.entrypoints.cli" else f"python -m {row.module}"
    return " ".join([head, *(f'"{a}"' if " " in a else a for a in row.args)])


def throughput_cell(r: dict) -> str:
    """One ``bench throughput --json`` result in a table cell."""
    cell = (
        f"{r['output_tokens_per_s']:,.0f} out tok/s ({r['output_tokens_per_s_min']:,.0f}.."
        f"{r['output_tokens_per_s_max']:,.0f}), {r['total_tokens_per_s']:,.0f} total, "
        f"{r['elapsed_s']:.2f} s, median of {r['runs']}; text {'on' if r['text'] else 'off'}"
    )
    if r.get("fraction_of_floor"):
        cell += f"; {100 * r['fraction_of_floor']:.0f}% of the floor"
    if r.get("prefix_cache_hit_tokens"):
        cell += f"; {r['prefix_cache_hit_tokens']:,} prompt tokens from the cache"
    if "hf_output_tokens_per_s" in r:
        cell += (
            f"; HF generate_batch {r['hf_output_tokens_per_s']:,.0f} tok/s "
            f"({r['speedup_vs_hf']:.1f}x)"
        )
    return cell


def run_row(row: Row, log_path: str) -> tuple[int, str, float]:
    """Runs one row: (exit status, result cell, seconds). Result lines are echoed as they come."""
    argv = command(row)
    json_path = log_path[:-4] + ".json"
    if row.throughput_json:
        argv += ["--json", json_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    kept, last = [], ""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(argv) + "\n")
        proc = children.popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        timer = threading.Timer(row.timeout, lambda: children.kill_group(proc))
        timer.daemon = True  # a runner that is told to stop does not wait for it
        timer.start()
        for line in proc.stdout:
            log.write(line)
            last = line.strip()[:240] or last
            if row.keep and re.search(row.keep, line):
                kept.append(" ".join(line.split())[:400])  # (serve_suite's rows run to ~300)
                print("   ", kept[-1], flush=True)
        rc = proc.wait()
        timer.cancel()
        children.done(proc)
    seconds = time.perf_counter() - t0
    if rc == 0 and row.throughput_json and os.path.exists(json_path):
        with open(json_path) as fh:
            return rc, throughput_cell(json.load(fh)), seconds
    if rc != 0:
        why = f"killed after {row.timeout} s" if rc == -signal.SIGKILL else f"exit {rc}"
        return rc, f"FAILED ({why}): {last}", seconds
    return rc, " / ".join(kept) or "(no result line)", seconds


def write_table(path: str, suite: str, lines: list[str]) -> str:
    table = "\n".join([f"### {suite}", HEADER, *lines]) + "\n"
    with open(path, "w") as fh:
        fh.write(table)
    return table


def run_suite(name: str, rows: list[Row], out_dir: str, only: list[str] | None) -> int:
    names, when, sha = gpu_names(), datetime.date.today().isoformat(), commit()
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    lines, failed = [], 0
    table_path = os.path.join(out_dir, f"{name}.md")
    print(f"== suite {name}: {card(names)}, {when}, commit {sha}", flush=True)
    for row in rows:
        if only and row.name not in only:
            continue
        if len(names) < row.gpus:
            print(f"-- {row.name}: skipped, needs {row.gpus} GPU(s), {len(names)} here", flush=True)
            continue
        print(f"-- {row.name}: {shown(row)}", flush=True)
        log_path = os.path.join(out_dir, name, re.sub(r"[^\w.-]+", "_", row.name) + ".log")
        rc, cell, seconds = run_row(row, log_path)
        failed += rc != 0
        print(f"   ({seconds:.0f} s) {cell}", flush=True)
        lines.append(f"| {row.name} | {cell} | {card(names)} | {when} | {sha} | `{shown(row)}` |")
        write_table(table_path, name, lines)  # rewritten per row: kept if a later row is cut
    print("\n" + write_table(table_path, name, lines), flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    children.kill_children_on_signals()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=", ".join(SUITES))
    parser.add_argument("--list", action="store_true", help="print every suite's rows and commands")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows (by name)")
    parser.add_argument(
        "--shapes", nargs="+", help="the throughput suite's shapes (default SHAPES)"
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or "/tmp/bench-out",
        help="logs and tables go here (default $OUT, else /tmp/bench-out)",
    )
    args = parser.parse_args(argv)
    suites = dict(SUITES)
    if args.shapes:
        suites["throughput"] = throughput_rows(args.shapes)
    unknown = [s for s in args.suites if s not in suites]
    if unknown or not (args.suites or args.list):
        parser.error(
            f"unknown suite(s) {unknown}; known: {', '.join(suites)}"
            if unknown
            else "name a suite, or --list"
        )
    if args.list:
        for name in args.suites or suites:
            print(name)
            for row in suites[name]:
                gpus = f"{row.gpus} GPU" if row.gpus else "CPU"
                print(f"  {row.name:<42} {gpus:<6} {row.timeout:>4} s  {shown(row)}")
        return 0
    failed = sum(run_suite(name, suites[name], args.out, args.only) for name in args.suites)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
