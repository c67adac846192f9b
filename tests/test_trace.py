"""The step trace (``--trace FILE``) and its report: what the trace says must be what the engine
did, and the page must show it."""

import gzip
import json
import os
import shutil

import pytest
from tiny_models import make_tiny_model, prompts_of_lengths

from vllm_lite import LLM, SamplingParams
from vllm_lite.trace_report import BlockMap, analyze, read_trace, report_main

BLOCK_SIZE, NUM_BLOCKS, BUDGET = 8, 24, 32
MAX_TOKENS = [24, 32, 40, 16]


def workload(vocab: int):
    """Two prompts share a 40-token prefix; a 70-token prompt is chunked; 24 blocks run out."""
    prefix = prompts_of_lengths([40], vocab, seed=1)[0]
    own = prompts_of_lengths([5, 9, 30, 70], vocab, seed=2)
    prompts = [prefix + own[0], prefix + own[1], own[2], own[3]]
    return prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def engine_state(engine) -> dict:
    """The block manager's state, read directly (the test's own view, not the tracer's)."""
    bm = engine.block_manager
    tables = {s.seq_id: list(s.block_table) for s in engine.scheduler.running if s.block_table}
    cached_free = {b for b in bm.free_blocks if bm.block_key[b] is not None}
    return {
        "tables": tables,
        "refs": list(bm.ref_counts),
        "cached_free": cached_free,
        "counter": bm.num_cached_free_blocks,
    }


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace")
    path = make_tiny_model(str(folder / "model"))
    config = dict(
        block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_num_batched_tokens=BUDGET, dtype="float32"
    )
    trace_path = str(folder / "run.jsonl")
    llm = LLM(path, trace=trace_path, **config)
    prompts, params = workload(llm.engine.hf_config.vocab_size)
    tracer, states = llm.engine.tracer, []
    step = tracer.step

    def step_and_snapshot(engine):
        outputs = step(engine)
        states.append(engine_state(engine))
        return outputs

    tracer.step = step_and_snapshot
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.close()
    with LLM(path, **config) as plain:
        untraced = plain.generate(prompts, params, use_tqdm=False)
    return {
        "path": trace_path,
        "trace": read_trace(trace_path),
        "outputs": outputs,
        "untraced": untraced,
        "states": states,
        "prompts": prompts,
        "folder": folder,
    }


def test_trace_shows_chunked_prefill_prefix_cache_hits_and_a_preemption(traced):
    steps = traced["trace"].steps
    # sequence ids count across the process's engines: the trace's "add" lines name the prompts'
    ids = [added[0] for r in steps for added in r.get("add", ())]
    chunks = [(seq, start, n) for r in steps for seq, start, n in r.get("p", ())]
    assert any(0 < start < 70 and seq == ids[3] for seq, start, _ in chunks), (
        "the 70-token prompt is chunked"
    )
    assert max(n for _, _, n in chunks) <= BUDGET
    # request 1 comes in with the second chunk of request 0: it finds the blocks of the first
    assert [b for r in steps for s, b in r.get("hit", ()) if s == ids[1]] == [BUDGET // BLOCK_SIZE]
    assert any(r.get("pre") for r in steps)
    assert any(r["pool"][3] > 0 for r in steps if "pool" in r), (
        "the shared prefix's blocks are shared"
    )


def test_trace_token_counts_add_up_to_the_outputs(traced):
    """Per sequence, the chunks and decodes run contiguously from where admission put it, and
    end at the last output token; the finished lines carry the outputs' lengths."""
    outputs, prompts = traced["outputs"], traced["prompts"]
    computed: dict[int, int] = {}
    for record in traced["trace"].steps:
        for seq in record.get("pre", ()):
            computed[seq] = 0
        hits = dict(record.get("hit", ()))
        for seq, start, n in record.get("p", ()):
            expected = hits[seq] * BLOCK_SIZE if seq in hits else computed.get(seq, 0)
            assert start == expected
            computed[seq] = start + n
        for seq in record.get("d", ()):
            computed[seq] += 1
    fins = {seq: out for r in traced["trace"].steps for seq, _, out, _ in r.get("fin", ())}
    ids = [added[0] for r in traced["trace"].steps for added in r.get("add", ())]
    assert (
        [fins[seq] for seq in ids] == [len(o.outputs[0].token_ids) for o in outputs] == MAX_TOKENS
    )
    # the last output token is sampled, never computed
    assert [computed[seq] for seq in ids] == [len(p) + m - 1 for p, m in zip(prompts, MAX_TOKENS)]
    analysis = analyze(traced["trace"])
    assert sum(r.output_tokens for r in analysis.requests.values()) == sum(MAX_TOKENS)


def test_block_map_rebuilt_from_the_deltas_equals_the_block_manager_at_every_step(traced):
    steps = [r for r in traced["trace"].steps if "pool" in r]
    assert len(steps) == len(traced["states"])
    rebuilt = BlockMap(NUM_BLOCKS)
    for record, state in zip(steps, traced["states"]):
        rebuilt.apply(record)
        assert rebuilt.tables == state["tables"], f"step {record['step']}"
        assert rebuilt.refs == state["refs"]
        assert rebuilt.cached_free == state["cached_free"] and state["counter"] == len(
            state["cached_free"]
        )
        assert rebuilt.pool() == record["pool"]


def test_tracing_leaves_the_outputs_unchanged(traced):
    assert [o.outputs[0].token_ids for o in traced["outputs"]] == [
        o.outputs[0].token_ids for o in traced["untraced"]
    ]


def test_a_gzipped_trace_cut_short_reads_up_to_the_cut(traced, tmp_path):
    with open(traced["path"], "rb") as fh:
        data = gzip.compress(fh.read())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    steps = read_trace(str(cut)).steps
    assert 0 < len(steps) < len(traced["trace"].steps)
    assert steps == traced["trace"].steps[: len(steps)]


def test_report_prints_a_summary_and_writes_a_page_without_network_and_a_png(
    traced, tmp_path, capsys
):
    pytest.importorskip("matplotlib")
    html, png = tmp_path / "r.html", tmp_path / "r.png"
    assert report_main([traced["path"], "-o", str(html), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    analysis = analyze(traced["trace"])
    preemptions = sum(r.preemptions for r in analysis.requests.values())
    assert (
        f"prefix-cache hits: {analysis.hit_blocks} blocks" in out
        and f"preemptions: {preemptions} " in out
    )
    page = html.read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


CHROMEDRIVER = "/usr/bin/chromedriver"


def test_report_page_in_headless_chromium_moves_the_block_map_with_the_slider(traced, tmp_path):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (pip install -e .[test])"
    )
    if not (os.path.exists(CHROMEDRIVER) and shutil.which("chromium")):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (scripts/install.sh installs "
            "them with apt-get as root)"
        )
    from selenium.webdriver.chrome.service import Service

    html = tmp_path / "r.html"
    report_main([traced["path"], "-o", str(html)])
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,1400",
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(html.as_uri())
        steps = [r for r in traced["trace"].steps if "pool" in r]
        preempted = next(i for i, r in enumerate(steps) if r.get("pre"))
        blocks = driver.find_element("id", "blocks")
        shots, counts = [], []
        for step in (0, preempted):
            driver.execute_script(
                "const s = document.getElementById('step'); s.value = arguments[0];"
                "s.dispatchEvent(new Event('input'));",
                step,
            )
            shots.append(blocks.screenshot_as_png)
            counts.append(
                [
                    int(driver.find_element("id", f"n-{k}").text)
                    for k in ("free", "cached", "used", "shared")
                ]
            )
            assert int(driver.find_element("id", "n-step").text) == step
        assert counts == [steps[0]["pool"], steps[preempted]["pool"]]
        assert shots[0] != shots[1]
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


def test_trace_file_is_json_lines_with_a_header(traced):
    with open(traced["path"]) as fh:
        header = json.loads(fh.readline())
    assert header["trace"] == "vllm-lite" and header["num_blocks"] == NUM_BLOCKS
    assert header["max_num_batched_tokens"] == BUDGET
