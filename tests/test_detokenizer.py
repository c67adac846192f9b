import random

import pytest
from tiny_models import make_tiny_model, make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vllm_lite import LLM, SamplingParams
from vllm_lite.engine.detokenizer import IncrementalDetokenizer, rust_decode_is_exact

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café 東京 Ελληνικά",  # multi-byte characters, some split across byte-level tokens
    "emoji 🙂🚀👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # 4-byte characters and a ZWJ sequence
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(params=["smollm2", "tiny"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def detokenize(
    tokenizer, prompt_ids, output_ids, skip_special_tokens, use_stream=None, at_end=False
):
    detok = IncrementalDetokenizer(
        tokenizer, prompt_ids, skip_special_tokens, use_stream=use_stream, at_end=at_end
    )
    pieces = [detok.add(t) for t in output_ids] + [detok.flush()]
    assert "".join(pieces) == detok.text
    if at_end:  # nothing before the end
        assert not any(pieces[:-1])
    return detok.text


def with_special_tokens(tokenizer, text):
    """``text``'s ids with the EOS and BOS tokens in the middle and at the end."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    half = len(ids) // 2
    return (
        ids[:half]
        + [tokenizer.eos_token_id, tokenizer.bos_token_id]
        + ids[half:]
        + [tokenizer.eos_token_id]
    )


def test_fast_tokenizers_take_the_rust_decode_path(tokenizer):
    assert rust_decode_is_exact(tokenizer)
    assert IncrementalDetokenizer(tokenizer, [], True).batch._rust is not None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize(
    "use_stream,at_end",
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["rust", "python", "at-end", "at-end-python"],
)
@pytest.mark.parametrize("text", TEXTS)
def test_text_equals_decode_of_the_output_ids(
    tokenizer, text, skip_special_tokens, use_stream, at_end
):
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    out = with_special_tokens(tokenizer, text)
    expected = tokenizer.decode(out, skip_special_tokens=skip_special_tokens)
    assert detokenize(tokenizer, prompt, out, skip_special_tokens, use_stream, at_end) == expected


@pytest.mark.parametrize("at_end", [False, True], ids=["per-token", "at-end"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_streams_decode_exactly(tokenizer, skip_special_tokens, at_end):
    """Arbitrary ids: lone UTF-8 continuation bytes, truncated characters, special tokens."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(20):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        out = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        expected = tokenizer.decode(out, skip_special_tokens=skip_special_tokens)
        assert detokenize(tokenizer, prompt, out, skip_special_tokens, at_end=at_end) == expected, (
            prompt,
            out,
        )


@pytest.mark.parametrize("at_end", [False, True], ids=["per-token", "at-end"])
def test_output_that_completes_a_character_begun_in_the_prompt_is_decoded_alone(tokenizer, at_end):
    ids = tokenizer.encode(" 東京🙂", add_special_tokens=False)
    for cut in range(1, len(ids)):
        prompt, out = ids[:cut], ids[cut:]
        assert detokenize(tokenizer, prompt, out, True, at_end=at_end) == tokenizer.decode(out), cut


def test_text_ending_mid_character_is_flushed_as_decode_gives_it(tokenizer):
    ids = tokenizer.encode("ok 東京🙂", add_special_tokens=False)
    out = next(
        ids[:k] for k in range(len(ids), 0, -1) if tokenizer.decode(ids[:k]).endswith("\ufffd")
    )
    detok = IncrementalDetokenizer(tokenizer, [], True)
    pieces = [detok.add(t) for t in out]
    assert "\ufffd" not in "".join(pieces)
    assert detok.flush().endswith("\ufffd")
    assert detok.text == tokenizer.decode(out)


def test_prompt_context_keeps_a_metaspace_tokenizers_leading_space():
    tok = Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert fast.decode([1]) == "world"  # alone, the first word loses its space
    assert detokenize(fast, [0], [1], True) == " world"  # after the prompt "hello" it keeps it
    assert detokenize(fast, [0], [1, 0], True, at_end=True) == " world hello"


def test_clean_up_tokenization_spaces_takes_the_decode_path():
    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(cleanup=False)  # transformers' clean-up pass only
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=True)
    out = [1, 2, 3]
    assert fast.decode(out) == "hello, world" != fast._tokenizer.decode(out)
    assert not rust_decode_is_exact(fast)
    assert detokenize(fast, [], out, True) == "hello, world"


# ---- through the engine: stop strings and stop tokens end the text where vLLM's would ----------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_model(str(tmp_path_factory.mktemp("m")), "qwen2"), num_blocks=128)


def seeded_run(llm, **kw):
    """Seeded sampling: the same tokens on every run until a stop ends it (varied text, where
    greedy decoding of the random tiny model repeats one token)."""
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=40, ignore_eos=True, **kw)
    return llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]


def clean_substring(text, start, length):
    """The first substring of ``length`` characters from ``start`` on without U+FFFD or spaces."""
    at = next(
        i
        for i in range(start, len(text) - length)
        if not any(c.isspace() or c == "\ufffd" for c in text[i : i + length])
    )
    return text[at : at + length]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sampled_output_text_equals_decode_of_its_ids(llm, skip_special_tokens):
    params = [
        SamplingParams(
            temperature=1.5,
            max_tokens=24,
            ignore_eos=True,
            seed=s,
            skip_special_tokens=skip_special_tokens,
        )
        for s in range(3)
    ]
    outs = llm.generate([[5, 6, 7], [300, 301, 302], [0, 1, 2]], params, use_tqdm=False)
    for o in outs:
        ids = o.outputs[0].token_ids
        assert o.outputs[0].text == llm.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens
        )


def test_offline_text_is_decoded_at_the_end_unless_a_stop_string_needs_it_per_token(llm):
    engine = llm.engine
    plain = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    stopping = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, stop=["zz"]))
    requests = engine.output_processor.requests
    assert not requests[plain.request_id].per_token and requests[stopping.request_id].per_token
    while engine.has_unfinished_requests():
        engine.step()


def test_stop_string_is_cut_from_the_text(llm):
    full = seeded_run(llm).text
    stop = clean_substring(full, len(full) // 3, 2)
    out = seeded_run(llm, stop=stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.find(stop)]


def test_include_stop_str_in_output_ends_the_text_after_the_stop_string(llm):
    full = seeded_run(llm).text
    stop = clean_substring(full, len(full) // 3, 2)
    out = seeded_run(llm, stop=stop, include_stop_str_in_output=True)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.find(stop) + len(stop)]


def test_the_stop_string_found_first_in_the_text_stops_it_whatever_the_list_order(llm):
    full = seeded_run(llm).text
    early, late = (
        clean_substring(full, len(full) // 3, 1),
        clean_substring(full, 2 * len(full) // 3, 2),
    )
    assert full.find(early) < full.find(late)
    out = seeded_run(llm, stop=[late, early])
    assert out.stop_reason == early and out.text == full[: full.find(early)]


def test_stop_string_inside_the_first_min_tokens_tokens_does_not_stop(llm):
    free = seeded_run(llm)
    ids, full = free.token_ids, free.text

    def usable(
        m,
    ):  # a stop character in the text of token m (the last held by min_tokens) seen again later
        before, upto = llm.tokenizer.decode(ids[: m - 1]), llm.tokenizer.decode(ids[:m])
        if not (upto.startswith(before) and full.startswith(upto)):
            return None
        return next(
            (
                c
                for c in upto[len(before) :]
                if not c.isspace() and c != "\ufffd" and full.find(c, len(upto)) >= 0
            ),
            None,
        )

    m = next(m for m in range(5, 30) if usable(m))
    stop, first = usable(m), llm.tokenizer.decode(ids[:m])
    out = seeded_run(llm, stop=stop, min_tokens=m)
    assert out.stop_reason == stop
    assert out.text == full[: full.find(stop, len(first))]


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_is_in_the_output_only_with_include_stop_str_in_output(llm, include):
    ids = seeded_run(llm).token_ids
    k = ids.index(ids[5])
    out = seeded_run(
        llm, stop_token_ids=[ids[k]], include_stop_str_in_output=include, skip_special_tokens=False
    )
    assert out.token_ids == ids[: k + 1]
    assert out.text == llm.tokenizer.decode(
        ids[: k + 1] if include else ids[:k], skip_special_tokens=False
    )


def test_one_batched_step_equals_each_sequence_stepped_alone(tokenizer):
    """The batch's windows differ in length and skip flag; each gets the text it would alone."""
    from vllm_lite.engine.detokenizer import BatchDetokenizer

    rng = random.Random(1)
    batch = BatchDetokenizer(tokenizer)
    vocab = len(tokenizer)
    seqs = [
        (
            [rng.randrange(vocab) for _ in range(4)],
            [rng.randrange(vocab) for _ in range(30)],
            i % 2 == 0,
        )
        for i in range(6)
    ]
    states = [batch.new_state(prompt, skip) for prompt, _, skip in seqs]
    for step in range(30):
        for s, (_, out, _) in zip(states, seqs):
            s.ids.append(out[step])
        batch.step(states)
    for s, (prompt, out, skip) in zip(states, seqs):
        batch.flush(s)
        assert s.text == detokenize(tokenizer, prompt, out, skip)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_steps_of_several_tokens_decode_exactly(tokenizer, skip_special_tokens):
    """Several new tokens a step (offline stop strings hand tokens over every few steps): texts
    with multi-byte characters and random ids, in steps of 1 to 9 tokens."""
    from vllm_lite.engine.detokenizer import BatchDetokenizer

    rng = random.Random(2)
    batch, vocab = BatchDetokenizer(tokenizer), len(tokenizer)
    outs = [with_special_tokens(tokenizer, t) for t in TEXTS]
    outs += [[rng.randrange(vocab) for _ in range(40)] for _ in range(6)]
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    for out in outs:
        state, done = batch.new_state(prompt, skip_special_tokens), 0
        while done < len(out):
            n = rng.randint(1, 9)
            state.ids += out[done : done + n]
            done += n
            batch.step([state])
        batch.flush(state)
        assert state.text == tokenizer.decode(out, skip_special_tokens=skip_special_tokens), out


def test_stop_string_in_tokens_held_back_by_an_unfinished_character_ends_at_its_token(
    smollm2_tokenizer,
):
    """A step's tokens end in half a character, so none of their text is emitted; the stop
    string they hold is found with the next step's tokens, and the output still ends at the
    token that completed it."""
    from vllm_lite.engine.output_processor import CoreOutputs, OutputProcessor

    say_end = smollm2_tokenizer.encode("Say END", add_special_tokens=False)
    smile = smollm2_tokenizer.encode("🙂", add_special_tokens=False)  # 2 tokens: 2 byte runs
    assert smollm2_tokenizer.decode(say_end + smile[:1]).endswith("\ufffd")
    processor = OutputProcessor(smollm2_tokenizer)
    processor.add_request("r", None, [1, 2, 3], SamplingParams(stop=["END"], max_tokens=20))
    first = processor.process(CoreOutputs(token_lists=[("r", 0, say_end + smile[:1])]))
    assert first.stops == []  # nothing emitted yet
    second = processor.process(CoreOutputs(token_lists=[("r", 0, smile[1:] + say_end)]))
    assert second.stops == [("r", 0)]
    out = second.finished[0].outputs[0]
    assert (out.text, out.token_ids, out.stop_reason) == ("Say ", say_end, "END")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_begun_in_an_earlier_step_ends_at_the_token_that_completes_it(
    smollm2_tokenizer, include
):
    """Only the new text and the characters just before it are searched: a stop string that
    begins in the text of an earlier step and ends in this one's is still found."""
    from vllm_lite.engine.output_processor import CoreOutputs, OutputProcessor

    say_en = smollm2_tokenizer.encode("Say EN", add_special_tokens=False)
    d_more = smollm2_tokenizer.encode("D more", add_special_tokens=False)
    processor = OutputProcessor(smollm2_tokenizer)
    params = SamplingParams(stop=["zz", "END"], include_stop_str_in_output=include)
    processor.add_request("r", None, [1, 2, 3], params)
    assert processor.process(CoreOutputs(token_lists=[("r", 0, say_en)])).stops == []
    step = processor.process(CoreOutputs(token_lists=[("r", 0, d_more)]))
    assert step.stops == [("r", 0)]
    out = step.finished[0].outputs[0]
    assert out.text == ("Say END" if include else "Say ") and out.stop_reason == "END"
    assert out.token_ids == say_en + d_more[:1]  # "D" completed it: " more" is void


@pytest.mark.parametrize("include", [False, True])
def test_offline_stop_string_checked_every_few_steps_ends_where_a_check_per_token_does(
    llm, monkeypatch, include
):
    from vllm_lite.engine import llm_engine

    full = seeded_run(llm).text
    stops = [clean_substring(full, len(full) // 2, 2), clean_substring(full, len(full) // 4, 1)]
    every_step = []
    for every in (1, llm_engine.TEXT_EVERY):
        monkeypatch.setattr(llm_engine, "TEXT_EVERY", every)
        out = seeded_run(llm, stop=stops, include_stop_str_in_output=include)
        every_step.append((out.text, out.token_ids, out.finish_reason, out.stop_reason))
    assert every_step[0] == every_step[1]
    assert every_step[0][3] == stops[1]


def test_stop_candidates_are_the_tokens_holding_a_stop_strings_last_byte(smollm2_tokenizer):
    from vllm_lite.engine.detokenizer import BatchDetokenizer

    ends = BatchDetokenizer(smollm2_tokenizer).stop_candidates(["a.", "\u2063"])
    period = smollm2_tokenizer.encode(".", add_special_tokens=False)
    e_mark = smollm2_tokenizer.encode("\u2063", add_special_tokens=False)  # 3 bytes, E2 81 A3
    assert set(period) <= ends and e_mark[-1] in ends
    assert smollm2_tokenizer.encode(" the", add_special_tokens=False)[0] not in ends


def test_stop_candidates_are_none_unless_tokens_decode_to_their_byte_level_bytes(
    tiny_tokenizer,
):
    from vllm_lite.engine.detokenizer import BatchDetokenizer

    assert BatchDetokenizer(tiny_tokenizer).stop_candidates(["."])  # byte-level BPE
    tok = Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.Metaspace()  # "▁" decodes to a space: not its bytes
    metaspace = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert BatchDetokenizer(metaspace).stop_candidates(["o"]) is None
    assert BatchDetokenizer(tiny_tokenizer).stop_candidates(["a\ufffd"]) is None


def test_offline_stop_strings_skipping_tokens_that_cannot_end_one_change_nothing(
    smollm2_tokenizer,
):
    """Randomized: steps of 1-9 tokens of text with multi-byte characters, stop strings taken
    from that text (some ending in a multi-byte character, some with min_tokens); the output
    processor that decodes only steps with a token able to end a stop string gives the same
    outputs as one that decodes every step."""
    from vllm_lite.engine.output_processor import CoreOutputs, OutputProcessor

    rng = random.Random(0)
    ids = smollm2_tokenizer.encode(" ".join(TEXTS * 3), add_special_tokens=False)
    text = smollm2_tokenizer.decode(ids)
    results, skipped = [], []
    for lazy in (True, False):
        rng.seed(0)
        processor, steps = OutputProcessor(smollm2_tokenizer), [0]

        def counted(req, c, tokens, must_decode=processor._must_decode, steps=steps):
            decode = must_decode(req, c, tokens)
            steps[0] += not decode
            return decode

        processor._must_decode = counted
        runs = []
        for r in range(60):
            start = rng.randrange(len(text) - 4)
            stops = [text[start : start + rng.randint(1, 3)] for _ in range(rng.randint(1, 2))]
            stops = [s for s in stops if "\ufffd" not in s] or ["zz"]
            params = SamplingParams(
                stop=stops,
                max_tokens=len(ids),
                min_tokens=rng.choice([0, 0, 5]),
                include_stop_str_in_output=rng.random() < 0.3,
            )
            processor.add_request(str(r), None, [1, 2, 3], params)
            if not lazy:
                processor.requests[str(r)].stop_ends = None
            pos, finished = 0, []
            while not finished and pos < len(ids):
                n = rng.randint(1, 9)
                core = CoreOutputs(token_lists=[(str(r), 0, ids[pos : pos + n])])
                pos += n
                if pos >= len(ids):  # the end: the core finished it by length
                    core.add(str(r), 0, -1)
                    core.finished.append((0, "length", None))
                step = processor.process(core)
                finished = step.finished
            out = finished[0].outputs[0]
            runs.append((out.text, out.token_ids, out.finish_reason, out.stop_reason))
        results.append(runs)
        skipped.append(steps[0])
    assert results[0] == results[1]
    assert sum(run[2] == "stop" for run in results[0]) > 40
    assert skipped[0] > 100 and skipped[1] == 0
