"""GPU shape sweep: engine-level greedy parity with HF transformers over model shapes real
models have (and odd ones; the mixture-of-experts families last), every case in a child process so
that a crash is recorded, not fatal to the sweep. Each case is printed as it finishes.

fp32 cases: our greedy tokens equal transformers' (same weights, on the GPU) token for token, or
the first difference is a true near-tie (reference logits of the two tokens within 1e-4).
bf16/fp16 cases: the Triton backend against the plain-PyTorch reference backend in the same
dtype; tokens may drift apart after a rounding near-tie, so the sweep reports the share of
equal tokens and fails only on a crash or an early disagreement.

Cases with a small KV pool run ``--workers`` at a time (their Triton compiles, which take most
of a case's time, use a CPU core each); next to them, cases whose pool is "default" (all the
memory ``gpu_memory_utilization`` leaves, up to ~10^8 blocks) run one at a time.

    python -m benchmarks.gpu_sweep                 # the whole grid
    python -m benchmarks.gpu_sweep --pool small    # the small-pool cases (default: the others)
    python -m benchmarks.gpu_sweep --only 0,3      # some cases
    python -m benchmarks.gpu_sweep --list          # print the grid
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The architectures the grid draws from: names of ``tests/tiny_models.py``'s ARCHS (its HF
# config and model classes and their own keyword arguments, e.g. the experts of a MoE model).
# Add a name here to sweep a new family; every case's shape keys override the arch's own.
SWEEP_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# archs whose config has no head_dim: it is hidden_size / num_attention_heads (as in Qwen2's
# checkpoints), so the case's hidden size is heads x head_dim
HEAD_DIM_FROM_HIDDEN = {"qwen2"}

# the grid's axes (issue 8: "No crash on any valid model")
HEAD_DIMS = [32, 48, 64, 80, 96, 128, 256]
GROUPS = [1, 2, 3, 4, 5, 6, 7, 8]  # query heads per KV head
BLOCK_SIZES = [1, 16, 32, 256]
EXTRA_CASES = 4  # grid cases beyond one per value of the longest axis


def issue_cases() -> list[dict]:
    """The shapes that crashed (issue 8): vocab 49,152, untied, 2 KV heads, head_dim 32, the
    default KV pool (all free GPU memory), with CUDA graphs and without; and the 1-KV-head tied
    Qwen2 that sized a pool of 9.2M blocks. (The same shape as Llama and Qwen3 added nothing:
    their layers differ in what the grid covers.)"""
    base = dict(
        hidden=128,
        inter=256,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=32,
        vocab=49152,
        max_pos=4096,
        tied=False,
        block_size=16,
        dtype="float32",
        eager=False,
        pool="default",
        max_num_seqs=256,
        lengths=[1, 7, 16, 17, 63, 128, 200, 250],
        new_tokens=24,
        std=0.08,
    )
    return [
        dict(base, name="issue-mistral", arch="mistral"),
        dict(base, name="issue-qwen3-eager", arch="qwen3", eager=True),
        dict(base, name="issue-qwen2-1kv-tied", arch="qwen2", kv_heads=1, tied=True),
    ]


def grid_cases(seed: int = 0) -> list[dict]:
    """Random configs that together cover every value of every axis at least once."""
    rng = random.Random(seed)
    n = max(len(HEAD_DIMS), len(GROUPS), len(BLOCK_SIZES), len(SWEEP_ARCHS)) + EXTRA_CASES

    def axis(values: list) -> list:  # every value at least once, in an order of its own
        out = (values * (n // len(values) + 1))[:n]
        rng.shuffle(out)
        return out

    archs, head_dims, groups, block_sizes = (
        axis(SWEEP_ARCHS),
        axis(HEAD_DIMS),
        axis(GROUPS),
        axis(BLOCK_SIZES),
    )
    kv, vocabs, max_poss = (
        axis([1, 2, 2]),
        axis([400, 49152, 70000, 151936]),
        axis([2048, 4096, 32768]),
    )
    tieds, eagers, pools = (
        axis([True, False]),
        axis([True, False, False]),
        axis(["default", "small", "small"]),
    )
    dtypes = axis(["float32"] * 4 + ["bfloat16", "float16"])
    cases = []
    for i in range(n):
        arch, head_dim, group, block_size = archs[i], head_dims[i], groups[i], block_sizes[i]
        kv_heads, vocab, max_pos, dtype = kv[i], vocabs[i], max_poss[i], dtypes[i]
        heads = group * kv_heads
        hidden = heads * head_dim if arch in HEAD_DIM_FROM_HIDDEN else heads * max(16, 64 // heads)
        long_prompt = min(max_pos - 64, max(300, 3 * block_size + 5))
        lengths = {1, 2, block_size, block_size + 1, 100, long_prompt, rng.randint(3, 60)}
        if max_pos <= 4096:  # one prompt that fills the context up to its last position
            lengths.add(max_pos - 13)
        lengths = sorted(lengths)
        cases.append(
            dict(
                name=f"g{i}-{arch}-d{head_dim}-q{heads}kv{kv_heads}-b{block_size}-{dtype}"
                + ("-eager" if eagers[i] else ""),
                arch=arch,
                hidden=hidden,
                inter=256,
                layers=2,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                vocab=vocab,
                max_pos=max_pos,
                tied=tieds[i],
                block_size=block_size,
                dtype=dtype,
                eager=eagers[i],
                pool=pools[i],
                max_num_seqs=16,
                lengths=lengths,
                new_tokens=12,
                std=0.08,
            )
        )
    return cases


# the mixture-of-experts families with their real routing (expert counts, top-k, shared expert,
# a dense layer, norm_topk_prob) at a small width; expert width 96 is no power of two
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=384,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=96, norm_topk_prob=True
    ),
}


def moe_cases() -> list[dict]:
    base = dict(
        hidden=256,
        inter=192,
        layers=3,
        heads=4,
        kv_heads=2,
        head_dim=64,
        vocab=4000,
        max_pos=4096,
        tied=False,
        pool="small",
        max_num_seqs=64,
        lengths=[1, 7, 16, 17, 63, 128, 300],
        new_tokens=16,
        std=0.08,
    )
    return [
        dict(
            base,
            name=f"moe-{arch}-b{block}-{dtype}{'-eager' if eager else ''}",
            arch=arch,
            moe=moe,
            block_size=block,
            dtype=dtype,
            eager=eager,
        )
        for arch, moe in MOE.items()
        for dtype, block, eager in [
            ("float32", 16, False),
            ("float32", 256, True),
            ("bfloat16", 16, False),
        ]
    ]


def all_cases() -> list[dict]:
    return issue_cases() + grid_cases() + moe_cases()


# ---- one case (child process) --------------------------------------------------------------
def build_model(case: dict, path: str) -> None:
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny_models import ARCHS

    config_cls, model_cls, arch_kwargs = ARCHS[case["arch"]]
    kw = dict(
        arch_kwargs,
        vocab_size=case["vocab"],
        hidden_size=case["hidden"],
        intermediate_size=case["inter"],
        num_hidden_layers=case["layers"],
        num_attention_heads=case["heads"],
        num_key_value_heads=case["kv_heads"],
        max_position_embeddings=case["max_pos"],
        tie_word_embeddings=case["tied"],
        initializer_range=case["std"],
        eos_token_id=0,
        bos_token_id=1,
    )
    kw.pop("head_dim", None)
    if case["arch"] not in HEAD_DIM_FROM_HIDDEN:
        kw["head_dim"] = case["head_dim"]
    kw.update(case.get("moe", {}))
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, case["std"])
    model.save_pretrained(path)


def run_case(case: dict) -> dict:
    import torch

    from vllm_lite import LLM, SamplingParams

    dtype = case["dtype"]
    with tempfile.TemporaryDirectory() as path:
        build_model(case, path)
        gen = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(2, case["vocab"], (n,), generator=gen).tolist() for n in case["lengths"]
        ]
        params = SamplingParams(
            temperature=0, max_tokens=case["new_tokens"], ignore_eos=True, detokenize=False
        )
        kw = dict(
            dtype=dtype,
            block_size=case["block_size"],
            enforce_eager=case["eager"],
            max_num_seqs=case["max_num_seqs"],
        )
        if case["pool"] == "small":
            kw["num_blocks"] = (
                -(-(sum(case["lengths"]) + len(prompts) * case["new_tokens"]) // case["block_size"])
                + 4
            )

        def engine_tokens(**extra):
            llm = LLM(path, **kw, **extra)
            try:
                outs = llm.generate(prompts, params, use_tqdm=False)
                bm = llm.engine.block_manager
                assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
                return [o.outputs[0].token_ids for o in outs], bm.num_blocks
            finally:
                llm.engine.close()
                torch.cuda.empty_cache()

        t0 = time.time()
        ours, num_blocks = engine_tokens()
        result = dict(num_blocks=num_blocks)
        if dtype == "float32":
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the sweep
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
            bad = []
            with torch.no_grad():
                for i, (p, mine) in enumerate(zip(prompts, ours)):
                    ids = torch.tensor([p], device=device)
                    ref = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=case["new_tokens"],
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )[0, len(p) :].tolist()
                    if mine == ref:
                        continue
                    first = next(
                        (j for j in range(min(len(mine), len(ref))) if mine[j] != ref[j]), None
                    )
                    if first is None:
                        bad.append(f"prompt {i}: lengths {len(mine)} vs {len(ref)}")
                        continue
                    logits = (
                        hf(torch.tensor([p + ref[:first]], device=device)).logits[0, -1].float()
                    )
                    gap = abs(logits[mine[first]] - logits[ref[first]]).item()
                    if gap >= 1e-4:
                        bad.append(
                            f"prompt {i} (len {len(p)}): diverged at {first}, logit gap {gap:.3g}"
                        )
            del hf
            result.update(ok=not bad, detail="; ".join(bad) or "token-equal or near-tie")
        else:
            ref, _ = engine_tokens(attention_backend="torch")
            total = sum(len(r) for r in ref)
            same = sum(a == b for mine, r in zip(ours, ref) for a, b in zip(mine, r))
            first_equal = sum(m[:1] == r[:1] for m, r in zip(ours, ref))
            ok = first_equal >= len(prompts) - 1
            result.update(
                ok=ok,
                detail=f"vs torch backend: {same}/{total} tokens equal, "
                f"first token equal {first_equal}/{len(prompts)}",
            )
        result["seconds"] = round(time.time() - t0, 1)
        return result


def worker(indices: list[int], results_path: str, deadline: float) -> None:
    cases = all_cases()
    for i in indices:
        if time.time() > deadline:
            res = dict(ok=None, detail="not run: time budget spent")
        else:
            with open(results_path, "a") as f:
                f.write(json.dumps({"index": i, "started": True}) + "\n")
            try:
                res = run_case(cases[i])
            except Exception as e:  # a Python error is a failure of this case, not of the sweep
                import traceback

                res = dict(
                    ok=False,
                    detail=f"{type(e).__name__}: {e}"[:500],
                    trace=traceback.format_exc()[-2000:],
                )
        with open(results_path, "a") as f:
            f.write(json.dumps({"index": i, **res}) + "\n")


class Reporter:
    """Prints each finished case at once (one line; a failure's trace indented under it)."""

    def __init__(self, cases: list[dict]) -> None:
        self.cases, self.lock, self.done = cases, threading.Lock(), {}

    def __call__(self, rec: dict) -> None:
        i, ok = rec["index"], rec["ok"]
        word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        line = (
            f"{word} sweep/{i}-{self.cases[i]['name']} {rec.get('seconds', '-')}s "
            f"blocks={rec.get('num_blocks', '-')} {rec['detail']}"
        )
        if not ok and rec.get("trace"):
            line += "\n    " + rec["trace"].replace("\n", "\n    ")
        with self.lock:
            self.done[i] = rec
            print(line, flush=True)


def drive(
    indices: list[int], results_path: str, prefix: list[str], report: Reporter, deadline: float
) -> None:
    """Run the cases in a child, reporting each as it finishes; if the child dies (a crash),
    report the case it was in and go on with the next in a new child."""
    todo = list(indices)
    log_path = results_path + ".log"  # the children's whole output
    open(log_path, "w").close()
    while todo:
        open(results_path, "w").close()
        cmd = prefix + [
            sys.executable,
            "-m",
            "benchmarks.gpu_sweep",
            "--worker",
            "--results",
            results_path,
            "--deadline",
            str(deadline),
            "--only",
            ",".join(map(str, todo)),
        ]
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        read, started = 0, None
        while True:
            exited = proc.poll() is not None
            with open(results_path) as f:
                text = f.read()
            complete = text[read : text.rfind("\n") + 1] if text.rfind("\n") >= read else ""
            read += len(complete)
            for line in complete.splitlines():
                rec = json.loads(line)
                if rec.get("started"):
                    started = rec["index"]
                else:
                    report(rec)
                    todo.remove(rec["index"])
                    started = None
            if exited:
                break
            time.sleep(0.5)
        if started is not None:  # the child died inside this case
            with open(log_path) as log:
                tail = log.read()[-1500:]
            report(
                dict(
                    index=started,
                    ok=False,
                    crash=True,
                    detail=f"CRASH (exit {proc.returncode}): " + " | ".join(tail.splitlines()[-6:]),
                )
            )
            todo.remove(started)
        elif todo:  # exited between cases: nothing more will run
            for i in list(todo):
                report(
                    dict(
                        index=i, ok=False, detail=f"child exited {proc.returncode} before the case"
                    )
                )
            todo.clear()


def run_sweep(
    indices: list[int],
    workers: int,
    results: str,
    prefix: list[str],
    report: Reporter,
    deadline: float,
) -> None:
    """Small-pool cases on ``workers`` children at once and, next to them, the default-pool
    cases one by one: one such engine takes ``gpu_memory_utilization`` (0.9) of the GPU, and the
    small ones fit in the rest (a few GB; 14 GB are left on an H200)."""
    cases = all_cases()
    small = [i for i in indices if cases[i]["pool"] != "default"]
    groups = [small[k::workers] for k in range(workers)]
    groups.append([i for i in indices if cases[i]["pool"] == "default"])
    threads = [
        threading.Thread(target=drive, args=(g, f"{results}.{k}", prefix, report, deadline))
        for k, g in enumerate(groups)
        if g
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", help="comma-separated case indices")
    ap.add_argument(
        "--pool",
        choices=["all", "small", "default"],
        default="all",
        help="only the cases with a small KV pool, or with the default one",
    )
    ap.add_argument("--workers", type=int, default=2, help="small-pool cases run at once")
    ap.add_argument(
        "--budget", type=float, default=float("inf"), help="seconds; later cases are not started"
    )
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--results", default=os.path.join(tempfile.gettempdir(), "gpu_sweep.jsonl"))
    ap.add_argument(
        "--sanitizer", action="store_true", help="run the children under compute-sanitizer"
    )
    ap.add_argument("--json", help="write every case's result here")
    args = ap.parse_args()
    cases = all_cases()
    indices = [int(x) for x in args.only.split(",")] if args.only else list(range(len(cases)))
    if args.pool != "all":
        indices = [
            i for i in indices if (cases[i]["pool"] == "default") == (args.pool == "default")
        ]
    if args.list:
        for i in indices:
            print(i, json.dumps(cases[i]))
        return
    if args.worker:
        return worker(indices, args.results, args.deadline)
    prefix = (
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99"]
        if args.sanitizer
        else []
    )
    start = time.time()
    report = Reporter(cases)
    run_sweep(
        indices,
        max(1, args.workers),
        args.results,
        prefix,
        report,
        min(args.deadline, start + args.budget),
    )
    failed = sum(not report.done[i]["ok"] for i in indices)
    print(
        f"sweep: {len(indices)} cases, {len(indices) - failed} passed, {failed} failed or not run, "
        f"{time.time() - start:.0f} s",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cases": [cases[i] for i in indices],
                    "results": [report.done[i] for i in indices],
                },
                f,
                indent=1,
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
