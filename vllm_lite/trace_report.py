"""``vllm-lite report TRACE``: read a step trace (engine/tracer.py wrote it), print a summary,
write one self-contained HTML page (the pool and the batch over time, the block map of the step
under a slider, the requests), and optionally a PNG of the two plots (matplotlib)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
from dataclasses import asdict, dataclass, field

PAGE = os.path.join(os.path.dirname(__file__), "trace_report.html")


@dataclass
class Trace:
    header: dict
    steps: list[dict]  # one per engine step, in order (a last record may hold only ``fin``)


def read_trace(path: str) -> Trace:
    """The trace at ``path``; a file cut short (a killed run) gives the steps up to the cut."""
    opener = gzip.open if path.endswith(".gz") else open
    records = []
    with opener(path, "rt") as fh:
        try:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a file cut short
                    break
        except EOFError:  # a gzip stream cut short
            pass
    if not records or records[0].get("trace") != "vllm-lite":
        raise ValueError(f"{path} is not a vllm-lite trace (run with --trace FILE to write one)")
    return Trace(records[0], records[1:])


class BlockMap:
    """The block tables, reference counts and cached-free blocks, rebuilt from the deltas."""

    def __init__(self, num_blocks: int) -> None:
        self.tables: dict[int, list[int]] = {}
        self.refs = [0] * num_blocks
        self.cached_free: set[int] = set()

    def apply(self, record: dict) -> None:
        for seq, keep, added in record.get("bt", ()):
            old = self.tables.get(seq, [])
            for block in old[keep:]:
                self.refs[block] -= 1
            for block in added:
                self.refs[block] += 1
                self.cached_free.discard(block)
            self.tables[seq] = old[:keep] + added
            if not self.tables[seq]:
                del self.tables[seq]
        self.cached_free.update(record.get("cf", ()))
        if "cfs" in record:
            self.cached_free = set(record["cfs"])

    def pool(self) -> list[int]:
        """[free, cached-free, used, shared], as the trace's ``pool`` counts them."""
        used = sum(1 for r in self.refs if r)
        shared = sum(1 for r in self.refs if r > 1)
        return [len(self.refs) - used, len(self.cached_free), used, shared]


@dataclass
class Request:
    """One completion (a sequence) of a request, as the trace saw it."""

    seq: int
    request_id: str
    index: int
    prompt_tokens: int
    arrival_ms: float
    first_token_ms: float | None = None  # end of the step that computed its prompt's last token
    finish_ms: float | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    preemptions: int = 0
    finish_reason: str | None = None
    prefill_tokens: int = 0  # computed in prefill chunks, recomputation after preemption included
    decode_tokens: int = 0
    chunks: int = 0

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_ms is None else self.first_token_ms - self.arrival_ms


@dataclass
class Analysis:
    requests: dict[int, Request] = field(default_factory=dict)
    prefill: list[int] = field(default_factory=list)  # tokens per step
    decode: list[int] = field(default_factory=list)
    pool: list[list[int]] = field(default_factory=list)
    preempted_steps: list[int] = field(default_factory=list)
    hit_blocks: int = 0


def analyze(trace: Trace) -> Analysis:
    out = Analysis()
    for i, record in enumerate(trace.steps):
        t_end = record.get("t", 0.0) + record.get("ms", 0.0)
        for seq, request_id, prompt, index in record.get("add", ()):
            out.requests[seq] = Request(seq, request_id, index, prompt, record.get("t", 0.0))
        if "pool" in record:  # not the closing record (late finishes only)
            prefill = 0
            for seq, start, n in record.get("p", ()):
                req = out.requests[seq]
                req.prefill_tokens += n
                req.chunks += 1
                prefill += n
                if req.first_token_ms is None and start + n >= req.prompt_tokens:
                    req.first_token_ms = t_end
            for seq in record.get("d", ()):
                out.requests[seq].decode_tokens += 1
            out.prefill.append(prefill)
            out.decode.append(len(record.get("d", ())))
            out.pool.append(record["pool"])
        for seq in record.get("pre", ()):
            out.requests[seq].preemptions += 1
        if "pre" in record:
            out.preempted_steps.append(i)
        out.hit_blocks += sum(b for _, b in record.get("hit", ()))
        for seq, reason, num_out, cached in record.get("fin", ()):
            req = out.requests.get(seq)
            if req is not None:
                req.finish_reason, req.output_tokens, req.cached_tokens = reason, num_out, cached
                req.finish_ms = t_end
    return out


def _quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    return f"median {statistics.median(values):.1f}, max {values[-1]:.1f}"


def summary(trace: Trace, analysis: Analysis) -> str:
    h, reqs = trace.header, list(analysis.requests.values())
    steps = [r for r in trace.steps if "pool" in r]
    wall = [r["ms"] for r in steps]
    span = (steps[-1]["t"] + steps[-1]["ms"]) / 1e3 if steps else 0.0
    finished = [r for r in reqs if r.finish_reason is not None]
    prompt = sum(r.prompt_tokens for r in reqs if r.index == 0)
    cached = sum(r.cached_tokens for r in finished if r.index == 0)
    chunked = sum(1 for r in reqs if r.chunks > 1 + r.preemptions)
    peak_used = max((p[2] for p in analysis.pool), default=0)
    peak_shared = max((p[3] for p in analysis.pool), default=0)
    ttft = [r.ttft_ms for r in reqs if r.index == 0 and r.ttft_ms is not None]
    num_out = sum(r.output_tokens or 0 for r in finished)
    preempted = analysis.preempted_steps
    more = " ..." if len(preempted) > 10 else ""
    lines = [
        f"trace of {h.get('model')}: {len(steps)} steps in {span:.2f} s; pool "
        f"{h['num_blocks']} blocks x {h['block_size']} tokens, token budget "
        f"{h['max_num_batched_tokens']} per step",
        f"sequences: {len(reqs)} ({len(finished)} finished), {num_out} output tokens; "
        f"prompts {prompt} tokens, {cached} found in the prefix cache",
        f"computed: {sum(analysis.prefill)} prefill tokens in {sum(r.chunks for r in reqs)} "
        f"chunks ({chunked} prompts chunked), {sum(analysis.decode)} decode tokens",
        f"prefix-cache hits: {analysis.hit_blocks} blocks reused on admission; preemptions: "
        f"{sum(r.preemptions for r in reqs)} (steps {preempted[:10]}{more})",
        f"pool: peak used {peak_used} of {h['num_blocks']} blocks, peak shared {peak_shared}",
        f"step wall time (ms): {_quantiles(wall)}; time to first token (ms): {_quantiles(ttft)}",
    ]
    return "\n".join(lines)


def write_html(trace: Trace, analysis: Analysis, path: str) -> None:
    data = {
        "header": trace.header,
        "steps": trace.steps,
        "summary": summary(trace, analysis),
        "requests": [dict(asdict(r), ttft_ms=r.ttft_ms) for r in analysis.requests.values()],
    }
    with open(PAGE) as fh:
        page = fh.read()
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside
    slot = '<script id="trace-data" type="application/json">null</script>'
    if slot not in page:
        raise RuntimeError(f"{PAGE} has lost its data slot: {slot}")
    with open(path, "w") as fh:
        fh.write(page.replace(slot, slot.replace("null", blob), 1))


def write_png(trace: Trace, analysis: Analysis, path: str) -> None:
    """The pool and the batch over the steps, for a README."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install 'vllm-lite[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(analysis.pool))
    free, cached, used, shared = (
        (list(c) for c in zip(*analysis.pool)) if analysis.pool else ([],) * 4
    )
    plain_free = [f - c for f, c in zip(free, cached)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True, dpi=90)
    ax1.stackplot(
        steps,
        used,
        cached,
        plain_free,
        colors=["#4c72b0", "#a5c8a0", "#e6e6e6"],
        step="post",
        labels=["used", "cached-free (prefix kept)", "free"],
    )
    ax1.plot(
        steps, shared, color="#c44e52", lw=1.2, drawstyle="steps-post", label="shared (ref > 1)"
    )
    ax1.set_ylabel("KV blocks")
    ax1.set_ylim(0, trace.header["num_blocks"])
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax1.set_title("KV block pool", fontsize=10)
    ax2.bar(steps, analysis.decode, width=1.0, color="#4c72b0", label="decode tokens")
    ax2.bar(
        steps,
        analysis.prefill,
        width=1.0,
        bottom=analysis.decode,
        color="#dd8452",
        label="prefill tokens",
    )
    ax2.axhline(
        trace.header["max_num_batched_tokens"], color="#c44e52", ls="--", lw=1, label="token budget"
    )
    for i, s in enumerate(analysis.preempted_steps):
        for ax in (ax1, ax2):
            ax.axvline(
                s, color="black", ls=":", lw=1, label="preemption" if i == 0 and ax is ax2 else None
            )
    ax2.set_ylabel("tokens per step")
    ax2.set_xlabel("engine step")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax2.set_title("batch: prefill vs decode tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vllm-lite report", description=__doc__)
    parser.add_argument("trace", help="a trace written with --trace FILE (FILE.gz: gzipped)")
    parser.add_argument("-o", "--output", help="the HTML page (default: TRACE with .html)")
    parser.add_argument("--png", help="also write the pool and batch plots here (needs matplotlib)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.trace):
        raise SystemExit(f"trace file {args.trace!r} not found")
    trace = read_trace(args.trace)
    analysis = analyze(trace)
    print(summary(trace, analysis))
    base = args.trace.removesuffix(".gz")
    html = args.output or os.path.splitext(base)[0] + ".html"
    write_html(trace, analysis, html)
    print(f"report: {html}")
    if args.png:
        write_png(trace, analysis, args.png)
        print(f"plots: {args.png}")
    return 0
