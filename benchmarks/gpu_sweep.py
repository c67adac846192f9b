"""GPU shape sweep: engine-level greedy parity with HF transformers over model shapes real
models have (and odd ones; the mixture-of-experts families last), every case in a child process so that a crash is recorded, not
fatal to the sweep.

fp32 cases: our greedy tokens equal transformers' (same weights, on the GPU) token for token, or
the first difference is a true near-tie (reference logits of the two tokens within 1e-4).
bf16/fp16 cases: the Triton backend against the plain-PyTorch reference backend in the same
dtype; tokens may drift apart after a rounding near-tie, so the sweep reports the share of
equal tokens and fails only on a crash, a NaN-free check, or an early disagreement.

    python -m benchmarks.gpu_sweep                 # the whole grid, a table at the end
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
import time

# the grid's axes (issue: "No crash on any valid model")
HEAD_DIMS = [32, 48, 64, 80, 96, 128, 256]
GROUPS = [1, 2, 3, 4, 5, 6, 7, 8]  # query heads per KV head
BLOCK_SIZES = [1, 16, 32, 256]
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def issue_cases() -> list[dict]:
    """The shapes that crashed (issue 8): vocab 49,152, untied, 2 KV heads, head_dim 32, the
    default KV pool (all free GPU memory) and CUDA graphs; and the 1-KV-head tied one that passed."""
    base = dict(hidden=128, inter=256, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=49152, max_pos=4096,
                tied=False, block_size=16, dtype="float32", eager=False, pool="default", max_num_seqs=256,
                lengths=[1, 7, 16, 17, 63, 128, 200, 250], new_tokens=24, std=0.08)
    return [
        dict(base, name="issue-mistral", arch="mistral"),
        dict(base, name="issue-mistral-eager", arch="mistral", eager=True),
        dict(base, name="issue-llama", arch="llama"),
        dict(base, name="issue-qwen3", arch="qwen3"),
        dict(base, name="issue-qwen2-1kv-tied", arch="qwen2", kv_heads=1, tied=True),
    ]


def grid_cases(seed: int = 0) -> list[dict]:
    """Random configs that together cover every value of every axis at least once."""
    rng = random.Random(seed)
    n = max(len(HEAD_DIMS), len(GROUPS), len(BLOCK_SIZES)) * 3

    def axis(values: list) -> list:  # every value at least once, in an order of its own
        out = (values * (n // len(values) + 1))[:n]
        rng.shuffle(out)
        return out

    archs, head_dims, groups, block_sizes = axis(ARCHS), axis(HEAD_DIMS), axis(GROUPS), axis(BLOCK_SIZES)
    kv, vocabs, max_poss = axis([1, 2, 2]), axis([400, 49152, 70000, 151936]), axis([2048, 4096, 32768])
    tieds, eagers, pools = axis([True, False]), axis([True, False, False]), axis(["default", "small", "small"])
    dtypes = axis(["float32"] * 4 + ["bfloat16", "float16"])
    cases = []
    for i in range(n):
        arch, head_dim, group, block_size = archs[i], head_dims[i], groups[i], block_sizes[i]
        kv_heads, vocab, max_pos, dtype = kv[i], vocabs[i], max_poss[i], dtypes[i]
        heads = group * kv_heads
        hidden = heads * head_dim if arch == "qwen2" else heads * max(16, 64 // heads)  # HF: heads divide it
        long_prompt = min(max_pos - 64, max(300, 3 * block_size + 5))
        lengths = {1, 2, block_size, block_size + 1, 100, long_prompt, rng.randint(3, 60)}
        if max_pos <= 4096:  # one prompt that fills the context up to its last position
            lengths.add(max_pos - 13)
        lengths = sorted(lengths)
        cases.append(dict(
            name=f"g{i}-{arch}-d{head_dim}-q{heads}kv{kv_heads}-b{block_size}-{dtype}{'-eager' if eagers[i] else ''}",
            arch=arch, hidden=hidden, inter=256, layers=2, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            vocab=vocab, max_pos=max_pos, tied=tieds[i], block_size=block_size, dtype=dtype,
            eager=eagers[i], pool=pools[i], max_num_seqs=16,
            lengths=lengths, new_tokens=12, std=0.08,
        ))
    return cases


# the mixture-of-experts families with their real routing (expert counts, top-k, shared expert,
# a dense layer, norm_topk_prob) at a small width; expert width 96 is no power of two
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=96,
                      shared_expert_intermediate_size=384, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=96, norm_topk_prob=True),
}


def moe_cases() -> list[dict]:
    base = dict(hidden=256, inter=192, layers=3, heads=4, kv_heads=2, head_dim=64, vocab=4000, max_pos=4096,
                tied=False, pool="default", max_num_seqs=64, lengths=[1, 7, 16, 17, 63, 128, 300],
                new_tokens=16, std=0.08)
    return [dict(base, name=f"moe-{arch}-b{block}-{dtype}{'-eager' if eager else ''}", arch=arch, moe=moe,
                 block_size=block, dtype=dtype, eager=eager)
            for arch, moe in MOE.items()
            for dtype, block, eager in [("float32", 16, False), ("float32", 256, True), ("bfloat16", 16, False)]]


def all_cases() -> list[dict]:
    return issue_cases() + grid_cases() + moe_cases()


# ---- one case (child process) --------------------------------------------------------------
def build_model(case: dict, path: str) -> None:
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "mixtral": (MixtralConfig, MixtralForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
               "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
    config_cls, model_cls = classes[case["arch"]]
    kw = dict(vocab_size=case["vocab"], hidden_size=case["hidden"], intermediate_size=case["inter"],
              num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
              num_key_value_heads=case["kv_heads"], max_position_embeddings=case["max_pos"],
              tie_word_embeddings=case["tied"], initializer_range=case["std"], eos_token_id=0, bos_token_id=1)
    if case["arch"] != "qwen2":
        kw["head_dim"] = case["head_dim"]
    if case["arch"] == "mistral":
        kw["sliding_window"] = None
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
        prompts = [torch.randint(2, case["vocab"], (n,), generator=gen).tolist() for n in case["lengths"]]
        params = SamplingParams(temperature=0, max_tokens=case["new_tokens"], ignore_eos=True, detokenize=False)
        kw = dict(dtype=dtype, block_size=case["block_size"], enforce_eager=case["eager"],
                  max_num_seqs=case["max_num_seqs"])
        if case["pool"] == "small":
            kw["num_blocks"] = -(-(sum(case["lengths"]) + len(prompts) * case["new_tokens"]) // case["block_size"]) + 4

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
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
            bad = []
            with torch.no_grad():
                for i, (p, mine) in enumerate(zip(prompts, ours)):
                    ids = torch.tensor([p], device="cuda")
                    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case["new_tokens"],
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                    if mine == ref:
                        continue
                    first = next((j for j in range(min(len(mine), len(ref))) if mine[j] != ref[j]), None)
                    if first is None:
                        bad.append(f"prompt {i}: lengths {len(mine)} vs {len(ref)}")
                        continue
                    logits = hf(torch.tensor([p + ref[:first]], device="cuda")).logits[0, -1].float()
                    gap = abs(logits[mine[first]] - logits[ref[first]]).item()
                    if gap >= 1e-4:
                        bad.append(f"prompt {i} (len {len(p)}): diverged at {first}, logit gap {gap:.3g}")
            del hf
            result.update(ok=not bad, detail="; ".join(bad) or "token-equal or near-tie")
        else:
            ref, _ = engine_tokens(attention_backend="torch")
            total = sum(len(r) for r in ref)
            same = sum(a == b for mine, r in zip(ours, ref) for a, b in zip(mine, r))
            first_equal = sum(m[:1] == r[:1] for m, r in zip(ours, ref))
            ok = first_equal >= len(prompts) - 1
            result.update(ok=ok, detail=f"vs torch backend: {same}/{total} tokens equal, "
                                        f"first token equal {first_equal}/{len(prompts)}")
        result["seconds"] = round(time.time() - t0, 1)
        return result


def worker(indices: list[int], results_path: str) -> None:
    cases = all_cases()
    for i in indices:
        with open(results_path, "a") as f:
            f.write(json.dumps({"index": i, "started": True}) + "\n")
        try:
            res = run_case(cases[i])
        except Exception as e:  # a Python error is a failure of this case, not of the sweep
            import traceback
            res = dict(ok=False, detail=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])
        with open(results_path, "a") as f:
            f.write(json.dumps({"index": i, **res}) + "\n")


def drive(indices: list[int], results_path: str, prefix: list[str]) -> dict[int, dict]:
    """Run the cases in a child; if it dies (a crash), record the case and go on with the next."""
    done: dict[int, dict] = {}
    todo = list(indices)
    open(results_path + ".log", "w").close()
    while todo:
        open(results_path, "w").close()
        cmd = prefix + [sys.executable, "-m", "benchmarks.gpu_sweep", "--worker", "--results", results_path,
                        "--only", ",".join(map(str, todo))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        with open(results_path + ".log", "a") as log:  # the children's whole output
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
        started = None
        for line in open(results_path):
            rec = json.loads(line)
            if rec.get("started"):
                started = rec["index"]
            else:
                done[rec["index"]] = rec
                started = None
        if started is not None:  # the child died inside this case
            tail = (proc.stderr or proc.stdout)[-1500:]
            done[started] = dict(index=started, ok=False, crash=True, detail=f"CRASH (exit {proc.returncode}): "
                                 + " | ".join(line for line in tail.splitlines()[-6:]))
        todo = [i for i in todo if i not in done]
        if proc.returncode != 0 and started is None and todo:
            for i in todo:
                done[i] = dict(index=i, ok=False, detail=f"child exited {proc.returncode} before the case")
            break
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated case indices")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=os.path.join(tempfile.gettempdir(), "gpu_sweep.jsonl"))
    ap.add_argument("--sanitizer", action="store_true", help="run the children under compute-sanitizer")
    ap.add_argument("--json", help="write every case's result here")
    args = ap.parse_args()
    cases = all_cases()
    indices = [int(x) for x in args.only.split(",")] if args.only else list(range(len(cases)))
    if args.list:
        for i in indices:
            print(i, json.dumps(cases[i]))
        return
    if args.worker:
        return worker(indices, args.results)
    prefix = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99"] if args.sanitizer else []
    done = drive(indices, args.results, prefix)
    failed = 0
    for i in indices:
        r = done[i]
        failed += not r["ok"]
        print(f"{i:3d} {'PASS' if r['ok'] else 'FAIL'} {cases[i]['name']:<42} {r.get('seconds', '-'):>6}s "
              f"blocks={r.get('num_blocks', '-')} {r['detail']}")
        if not r["ok"] and r.get("trace"):
            print("    " + r["trace"].replace("\n", "\n    "))
    print(f"{len(indices) - failed}/{len(indices)} cases passed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": [cases[i] for i in indices], "results": [done[i] for i in indices]}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
