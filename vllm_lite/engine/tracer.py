"""A step trace: what every engine step did to the batch and to the KV block pool, one JSON line
per step, for ``vllm-lite report`` to draw (``--trace FILE``, ``LLM(trace=FILE)``; ``FILE.gz``
is gzipped).

The engine calls ``StepTracer.step`` in place of its own step when tracing is on; the tracer
times the scheduler's decision and ``run_batch`` and then writes what changed. Block tables go
out as deltas: ``[seq, keep, added]`` means the table is now ``table[:keep] + added`` (a table
only grows, or is emptied when its sequence finishes or is preempted). The tracer looks only at
the sequences that can have changed (the batch, the running ones, the ones holding blocks), so
its cost per step follows the batch, not the queue.

The file: a header line ``{"trace": "vllm-lite", "version": 1, ...engine shape}``, then one
line per step with ``step``, ``t`` (ms since the trace began, at the step's start), ``ms`` (the
step's wall time) and, when not empty:
- ``add``: requests seen queued for the first time ``[seq, request id, prompt tokens, index]``
  (forked completions of an ``n > 1`` request appear here too, with their index);
- ``p``: prefill chunks ``[seq, first position, tokens]``; ``d``: decodes (seq ids, one token);
- ``pre``: sequences preempted; ``hit``: ``[seq, blocks]`` found in the prefix cache on admission;
- ``bt``: block-table deltas; ``cf``: blocks that became cached-free (freed with their cached
  K/V kept); ``cfs``: the whole cached-free set, written only when the short way lost track
  (a block taken and freed again within one step, or a prefix-cache reset);
- ``fin``: finished sequences ``[seq, reason, output tokens, cached prompt tokens]``;
- ``pool``: ``[free, cached-free, used, shared]`` block counts after the step (cached-free
  blocks are among the free ones; shared: held by more than one sequence).
"""

from __future__ import annotations

import atexit
import gzip
import json
import time

from vllm_lite.engine.sequence import Sequence


class StepTracer:
    def __init__(self, path: str, engine) -> None:
        self.path = path
        self.file = (
            gzip.open(path, "wt", compresslevel=6) if path.endswith(".gz") else open(path, "w")
        )
        bm, config = engine.block_manager, engine.config
        self.block_manager = bm
        self.refs = [0] * bm.num_blocks  # the block tables as the trace has told them
        self.num_shared = 0
        self.cached_free: set[int] = set()
        # sequences holding blocks: seq_id -> (seq, its table as last written, its preemptions)
        self.tables: dict[int, tuple[Sequence, list[int], int]] = {}
        self.live: dict[int, Sequence] = {}  # seen, not finished
        self.num_steps = 0
        self.start = time.perf_counter()
        self.last_flush = self.start
        self._write(
            {
                "trace": "vllm-lite",
                "version": 1,
                "model": engine.model_path,
                "num_blocks": bm.num_blocks,
                "block_size": bm.block_size,
                "max_num_batched_tokens": config.max_num_batched_tokens,
                "max_num_seqs": config.max_num_seqs,
                "prefix_caching": bm.enable_prefix_caching,
                "started": time.time(),
            }
        )
        atexit.register(self.close)

    def step(self, engine) -> list:
        """One engine step (``engine.run_batch`` of the scheduler's decision), recorded."""
        record: dict = {"step": self.num_steps}
        self._note_new(engine.scheduler.waiting, record)
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        outputs = engine.run_batch(batch)
        t1 = time.perf_counter()
        record["t"], record["ms"] = round((t0 - self.start) * 1e3, 3), round((t1 - t0) * 1e3, 3)
        self._record(engine, batch, record)
        self.num_steps += 1
        self._write(record)
        if t1 - self.last_flush > 1.0:  # a served run's trace stays readable while it grows
            self.file.flush()
            self.last_flush = t1
        return outputs

    def _note_new(self, waiting, record: dict) -> None:
        """New requests are queued at the back of ``waiting`` (preempted ones at the front)."""
        new = []
        for seq in reversed(waiting):
            if seq.seq_id in self.live:
                break
            new.append(seq)
        if new:
            record["add"] = [self._added(s) for s in reversed(new)]

    def _added(self, seq: Sequence) -> list:
        self.live[seq.seq_id] = seq
        return [seq.seq_id, seq.request_id, seq.num_prompt_tokens, seq.index]

    def _record(self, engine, batch, record: dict) -> None:
        prefill, decode = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens - n
            if n == 1 and start >= seq.num_prompt_tokens:
                decode.append(seq.seq_id)
            else:
                prefill.append([seq.seq_id, start, n])
        forks = [s for s in engine.scheduler.running if s.seq_id not in self.live]
        if forks:
            record.setdefault("add", []).extend(self._added(s) for s in forks)
        # every sequence whose table may have changed: held blocks before, or runs now
        seqs = {s.seq_id: s for s in engine.scheduler.running}
        seqs.update((i, seq) for i, (seq, _, _) in self.tables.items())
        seqs.update((s.seq_id, s) for s in batch.seqs)
        deltas, preempted, freed = [], [], []
        admitted, unseen_blocks = set(), False
        bs = self.block_manager.block_size
        for seq_id, seq in seqs.items():
            _, old, num_preemptions = self.tables.get(seq_id) or (seq, [], seq.num_preemptions)
            new = seq.block_table
            # finished within the step after taking a block in it: the block came and went unseen
            unseen_blocks |= seq.is_finished and seq.num_computed_tokens > len(old) * bs
            if seq.num_preemptions != num_preemptions:
                preempted.append(seq_id)
                admitted.add(seq_id)
            elif not old:
                admitted.add(seq_id)
            if new != old:
                keep = 0
                while keep < min(len(old), len(new)) and old[keep] == new[keep]:
                    keep += 1
                deltas.append([seq_id, keep, new[keep:]])
                freed += self._move_refs(old[keep:], new[keep:])
            if new:
                self.tables[seq_id] = (seq, list(new), seq.num_preemptions)
            else:
                self.tables.pop(seq_id, None)
        hits = [
            [s.seq_id, (s.num_computed_tokens - n) // bs]
            for s, n in zip(batch.seqs, batch.num_new_tokens)
            if s.seq_id in admitted and s.num_computed_tokens - n >= bs
        ]
        finished = [s for s in seqs.values() if s.is_finished]
        for seq in finished:
            self.live.pop(seq.seq_id, None)
        for key, value in (
            ("p", prefill),
            ("d", decode),
            ("pre", preempted),
            ("hit", hits),
            ("bt", deltas),
        ):
            if value:
                record[key] = value
        self._record_cached_free(freed, unseen_blocks, record)
        if finished:
            record["fin"] = [self._finished(s) for s in finished]
        bm = self.block_manager
        free = bm.num_free_blocks
        record["pool"] = [free, bm.num_cached_free_blocks, bm.num_blocks - free, self.num_shared]

    def _move_refs(self, removed: list[int], added: list[int]) -> list[int]:
        """Apply a delta to the reference counts; returns the blocks it left unheld."""
        refs, freed = self.refs, []
        for block in removed:
            refs[block] -= 1
            self.num_shared -= refs[block] == 1
            if refs[block] == 0:
                freed.append(block)
        for block in added:
            refs[block] += 1
            self.num_shared += refs[block] == 2
            self.cached_free.discard(block)
        return freed

    def _record_cached_free(self, freed: list[int], unseen_blocks: bool, record: dict) -> None:
        """Blocks freed with a cached prefix join the set, blocks taken leave it (``_move_refs``).
        A block taken and freed within one step, or a reset, is not in the deltas: then the set
        is read from the block manager (a pass over the free list, on those steps only)."""
        keys, refs = self.block_manager.block_key, self.refs
        now = [b for b in freed if refs[b] == 0 and keys[b] is not None]
        if now:
            self.cached_free.update(now)
            record["cf"] = now
        if unseen_blocks or len(self.cached_free) != self.block_manager.num_cached_free_blocks:
            actual = {b for b in self.block_manager.free_blocks if keys[b] is not None}
            if actual != self.cached_free:
                self.cached_free = actual
                record["cfs"] = sorted(actual)

    @staticmethod
    def _finished(seq: Sequence) -> list:
        return [seq.seq_id, seq.finish_reason, seq.num_output_tokens, seq.num_cached_tokens]

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Finish the file: sequences that ended unseen (aborted while queued) get their line."""
        if self.file.closed:
            return
        gone = [s for s in self.live.values() if s.is_finished]
        if gone:
            self._write(
                {
                    "step": self.num_steps,
                    "t": round((time.perf_counter() - self.start) * 1e3, 3),
                    "fin": [self._finished(s) for s in gone],
                }
            )
        self.file.close()
        atexit.unregister(self.close)
