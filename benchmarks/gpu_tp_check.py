"""Tensor parallelism on real GPUs: greedy parity across tp sizes, and a clean exit.

    python -m benchmarks.gpu_tp_check parity --tp 1 2 4    # tiny models with 1, 2 and 4 KV heads
    python -m benchmarks.gpu_tp_check smollm2 --tp 1 3      # the real SmolLM2 (9 heads: tp 1 or 3)
    python -m benchmarks.gpu_tp_check exit --tp 2           # after a run, Ctrl-C and a killed worker

Parity: every tp size's greedy tokens equal transformers' (fp32, same weights, on the GPU), or
the first difference is a true near-tie (< 1e-4 between the reference's two logits). Each
engine runs in its own process with CUDA graphs on and the default KV pool, as a user runs it.
Exit: the engine process and its workers are gone within a bound, no GPU process is left
(nvidia-smi), and multiprocessing reports no leaked semaphores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NEW_TOKENS = 24
LENGTHS = [1, 7, 16, 17, 63, 128, 200, 250]

MODELS = {  # name -> (arch, kv heads, tied, vocab)
    "qwen2-kv1-tied": ("qwen2", 1, True, 49152),
    "llama-kv2-oddvocab": ("llama", 2, False, 50001),
    "mistral-kv4": ("mistral", 4, False, 49152),
}


_CHILDREN: list[subprocess.Popen] = []
_DUMP_DIR = tempfile.mkdtemp(prefix="tp_stacks_")
_SITE = """import faulthandler, os
if os.environ.get("TPCHECK_DUMP_DIR"):
    _f = open(os.path.join(os.environ["TPCHECK_DUMP_DIR"], f"{os.getpid()}.txt"), "w")
    faulthandler.dump_traceback_later(float(os.environ.get("TPCHECK_DUMP_AFTER", "30")), repeat=True, file=_f)
"""


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """A child in its own session whose every process (spawned workers too) writes its Python
    stacks to _DUMP_DIR every 30 s, so that a hang says where it hangs."""
    site = os.path.join(_DUMP_DIR, "site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(_SITE)
    env = dict(
        os.environ,
        TPCHECK_DUMP_DIR=_DUMP_DIR,
        PYTHONPATH=os.pathsep.join([site, os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    )
    # output goes to files, not pipes: a child blocked on a full stderr pipe that nobody reads
    # (NCCL and torch warnings from every rank) looks exactly like a hang
    n = len(_CHILDREN)
    out, err = (open(os.path.join(_DUMP_DIR, f"child{n}.{k}"), "w+") for k in ("out", "err"))
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=err, text=True, start_new_session=True, env=env, **kw
    )
    proc.out_file, proc.err_file = out, err
    _CHILDREN.append(proc)
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    """What the child wrote so far to stdout and stderr."""
    proc.out_file.flush()
    return tuple(open(f.name).read() for f in (proc.out_file, proc.err_file))


def kill_children(*_) -> None:
    """Also on SIGTERM (an outer `timeout`): no engine may outlive the check holding GPUs."""
    for proc in _CHILDREN:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if _:
        sys.exit(124)


def stacks() -> str:
    """The last stack dump of every child process (the frames that matter for a hang)."""
    out = []
    for name in sorted(os.listdir(_DUMP_DIR)):
        if name.endswith(".txt"):
            text = open(os.path.join(_DUMP_DIR, name)).read()
            last = text[text.rfind("Timeout (") :] if "Timeout (" in text else ""
            if last:
                out.append(f"--- pid {name[:-4]}\n{last.strip()}")
    return "\n".join(out)


def build(name: str, path: str) -> None:
    from benchmarks.gpu_sweep import build_model

    arch, kv, tied, vocab = MODELS[name]
    build_model(
        dict(
            arch=arch,
            vocab=vocab,
            hidden=256,
            inter=512,
            layers=2,
            heads=8,
            kv_heads=kv,
            head_dim=32,
            max_pos=4096,
            tied=tied,
            std=0.08,
        ),
        path,
    )


def smollm2_shape() -> str:
    """SmolLM2-135M's config (30 layers, 9 heads / 3 KV heads, tied) with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = os.path.join(
        os.path.dirname(__file__), "..", "vllm_lite", "model_configs", "smollm2-135m.json"
    )
    path = tempfile.mkdtemp()
    config = AutoConfig.from_pretrained(cfg)
    config.dtype = "float32"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def prompts(vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def engine_child(path: str, tp: int, out: str, dtype: str) -> None:
    """One engine, one generate; writes the tokens (run in a fresh process per tp size)."""
    from transformers import AutoConfig

    from vllm_lite import LLM, SamplingParams

    vocab = AutoConfig.from_pretrained(path).vocab_size
    llm = LLM(path, dtype=dtype, tensor_parallel_size=tp)
    t0 = time.time()
    outs = llm.generate(
        prompts(vocab),
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False),
        use_tqdm=False,
    )
    with open(out, "w") as f:
        json.dump(
            {"tokens": [o.outputs[0].token_ids for o in outs], "seconds": time.time() - t0}, f
        )


def hf_check(path: str, results: dict[int, list[list[int]]]) -> dict[int, str]:
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    verdict = {}
    with torch.no_grad():
        ps = prompts(hf.config.vocab_size)
        refs = []
        for p in ps:
            ids = torch.tensor([p], device=dev)
            refs.append(
                hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0, len(p) :].tolist()
            )
        for tp, tokens in results.items():
            bad, ties = [], 0
            for i, (p, mine, ref) in enumerate(zip(ps, tokens, refs)):
                if mine == ref:
                    continue
                first = next(j for j in range(len(ref)) if j >= len(mine) or mine[j] != ref[j])
                if first >= len(mine):
                    bad.append(f"prompt {i}: {len(mine)} tokens")
                    continue
                logits = hf(torch.tensor([p + ref[:first]], device=dev)).logits[0, -1].float()
                gap = abs(logits[mine[first]] - logits[ref[first]]).item()
                if gap < 1e-4:
                    ties += 1
                else:
                    bad.append(f"prompt {i} diverged at {first} (gap {gap:.3g})")
            verdict[tp] = "FAIL " + "; ".join(bad) if bad else f"PASS ({ties} near-ties)"
    return verdict


def run_parity(path: str, tps: list[int], dtype: str = "float32") -> dict[int, str]:
    results, verdict = {}, {}
    for tp in tps:
        out = os.path.join(tempfile.mkdtemp(), "out.json")
        t0 = time.time()
        proc = start(
            [sys.executable, "-m", "benchmarks.gpu_tp_check", "_child", path, str(tp), out, dtype]
        )
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            kill_children()
            verdict[tp] = (
                f"HANG: no exit within 180 s (output {'written' if os.path.exists(out) else 'missing'})\n"
                + stacks()
            )
            continue
        wall = time.time() - t0
        stderr = output(proc)[1]
        leaks = "leaked semaphore" in stderr
        if proc.returncode != 0 or not os.path.exists(out):
            verdict[tp] = f"CRASH exit {proc.returncode}: " + " | ".join(
                stderr.strip().splitlines()[-4:]
            )
            continue
        results[tp] = json.load(open(out))["tokens"]
        verdict[tp] = f"process {wall:.0f}s" + (" LEAKED SEMAPHORES" if leaks else "")
    for tp, v in hf_check(path, results).items():
        verdict[tp] = f"{v}; {verdict[tp]}"
    return verdict


def gpu_processes() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


EXIT_SCRIPT = """
import os, sys, time
import torch
from vllm_lite import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], dtype="bfloat16" if torch.cuda.is_available() else "float32",
              tensor_parallel_size=int(sys.argv[2]))
    print("PIDS", *llm.engine.runner.worker_pids, flush=True)
    n, batch = int(sys.argv[3]), 64
    if not torch.cuda.is_available():  # gloo on a CPU: a smaller run of the same shape
        n, batch = min(n, 400 if n > 200 else 10), 4
    try:
        llm.generate([[5] * 100] * batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    except RuntimeError as e:
        print("ENGINE ERROR:", str(e).splitlines()[0], flush=True)
        sys.exit(3)
    print("DONE", flush=True)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def run_exit_checks(path: str, tp: int) -> None:
    """A normal run, Ctrl-C mid-generate, and a worker killed mid-generate."""
    script = os.path.join(tempfile.mkdtemp(), "exit_child.py")
    with open(script, "w") as f:
        f.write(EXIT_SCRIPT)
    for case in ("normal", "ctrl-c", "kill-worker"):
        n = 200 if case == "normal" else 3000
        proc = start([sys.executable, script, path, str(tp), str(n)])
        pids, deadline = [], time.time() + 120
        while not pids and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            pids = [
                int(x)
                for line in output(proc)[0].splitlines()
                if line.startswith("PIDS")
                for x in line.split()[1:]
            ]
        if not pids:
            print(f"{case:<12} no engine after 120 s (exit {proc.poll()})\n{stacks()}", flush=True)
        time.sleep(3)  # mid-generate
        t0 = time.time()
        if case == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        elif case == "kill-worker" and pids:
            os.kill(pids[-1], signal.SIGKILL)
        try:
            proc.wait(timeout=60)
            status = f"exit {proc.returncode} after {time.time() - t0:.1f}s"
        except subprocess.TimeoutExpired:
            kill_children()
            status = "HANG (killed after 60 s)\n" + stacks()
        out, err = output(proc)
        time.sleep(1)
        alive = [p for p in pids if running(p)]
        leaks = "leaked semaphore" in err
        gpu = gpu_processes()
        note = (out.strip().splitlines() or [""])[-1][:160]
        print(
            f"{case:<12} {status}; workers left {alive}; GPU processes {gpu}; "
            f"{'LEAKED SEMAPHORES; ' if leaks else ''}last line: {note}",
            flush=True,
        )
        if ("Traceback" in err and case == "normal") or (
            proc.returncode or 0
        ) < 0:  # a crash says why
            print("   stderr: " + " | ".join(err.strip().splitlines()[-5:]), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return engine_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["parity", "smollm2", "exit"])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, kill_children)
    if args.what == "smollm2":
        from vllm_lite.default_model import default_model_path

        try:
            path, label = default_model_path(), "smollm2"
        except Exception as e:  # no GGUF on this machine: random weights of its shape
            path, label = smollm2_shape(), "smollm2-shape (random weights)"
            print(f"real SmolLM2 unavailable ({type(e).__name__}); using its shape", flush=True)
        for tp, v in run_parity(path, args.tp, args.dtype).items():
            print(f"{label} tp={tp}: {v}", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "exit":
            build("llama-kv2-oddvocab", tmp)
            return run_exit_checks(tmp, args.tp[-1])
        for name in MODELS:
            path = os.path.join(tmp, name)
            build(name, path)
            for tp, v in run_parity(path, args.tp, args.dtype).items():
                print(f"{name} tp={tp}: {v}", flush=True)


if __name__ == "__main__":
    main()
