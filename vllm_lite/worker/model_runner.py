"""The model runner: owns the model and its slice of the paged KV pool on one device, turns a
scheduled batch into step tensors (token ids, positions, slot mapping, block tables), runs the
model and returns logits. In tensor-parallel runs every rank has one; rank 0 prepares the
step and samples."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from vllm_lite.attention import AttentionMetadata, SharedPrefix, forward_context, get_backend
from vllm_lite.attention.layer import Attention
from vllm_lite.config import EngineConfig
from vllm_lite.models import get_model_class
from vllm_lite.models.loader import init_dummy_weights, load_weights
from vllm_lite.worker.batch import ScheduledBatch, SequenceRows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# every model runner of this process that is not yet collected: a new engine short of memory
# says how much the others hold (a notebook's previous ``llm``, say)
_LIVE_RUNNERS: weakref.WeakSet = weakref.WeakSet()


def bytes_held_by_other_engines(runner: ModelRunner) -> int:
    """Weights and KV pools of the live runners on ``runner``'s device, ``runner`` excepted."""

    def same(d: torch.device) -> bool:
        return d.type == runner.device.type and (d.index or 0) == (runner.device.index or 0)

    return sum(r.device_bytes() for r in list(_LIVE_RUNNERS) if r is not runner and same(r.device))


@dataclass
class StepInput:
    """Everything a rank needs to run one step; plain numpy so it pickles cheaply."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    logits_indices: np.ndarray  # rows of the step whose next token is sampled
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    prefill_is_fresh: bool
    # per token: index into the previous step's sampled tokens where the token id is still a
    # placeholder (overlapped steps), else -1; None when there is no placeholder
    prev_index: np.ndarray | None = None
    # cascade attention (pure decode steps): the rows (1/0 [B] int32) whose first shared_len
    # keys are the blocks shared_blocks; shared_len 0: none
    shared_len: int = 0
    shared_rows: np.ndarray | None = None
    shared_blocks: np.ndarray | None = None
    # a step laid out for a captured mixed graph (``ModelRunner.graph_layout``): padded, with
    # the decodes' lengths ([num_seqs], 0 past them) and the prefill kernel's work list
    decode_lens: np.ndarray | None = None
    prefill_work: np.ndarray | None = None


class BlockTableRows:
    """The block tables of recent steps' sequences as rows of one array kept between steps: a
    step copies only the blocks added since its sequences' last step (a decode: one block per
    sequence every block_size steps) and gathers its rows with one indexing. A block table only
    grows by appending (``BlockManager.allocate``) or is replaced by a new list (``free``,
    ``share``), so a row that copied the same list object holds a prefix of it."""

    def __init__(self, num_rows: int) -> None:
        self.slots = SequenceRows(num_rows)
        self.rows = np.zeros((num_rows, 1), np.int32)  # a table's blocks, then zeros
        self.copied: list[list[int] | None] = [None] * num_rows  # held, so that `is` is exact
        self.length = [0] * num_rows  # blocks of ``copied`` the row holds

    def gather(self, seqs: list) -> np.ndarray:
        """``[len(seqs), longest table]`` int32, row i sequence i's table, zero-padded."""
        index, given = self.slots.assign(seqs)
        if self.slots.num_rows > len(self.copied):
            extra = self.slots.num_rows - len(self.copied)
            self.rows = np.pad(self.rows, ((0, extra), (0, 0)))
            self.copied += [None] * extra
            self.length += [0] * extra
        for row in given:
            self.copied[row] = None  # another sequence's table: zeroed below
        width = max(len(s.block_table) for s in seqs)
        if width > self.rows.shape[1]:  # at least double, so that it is rare
            self.rows = np.pad(
                self.rows, ((0, 0), (0, max(width - self.rows.shape[1], self.rows.shape[1])))
            )
        rows, copied, length = self.rows, self.copied, self.length
        for seq, row in zip(seqs, index):
            table = seq.block_table
            if copied[row] is not table:  # the sequence's first step, or a new table (preempted)
                rows[row, : length[row]] = 0
                copied[row], length[row] = table, 0
            if length[row] < len(table):
                rows[row, length[row] : len(table)] = table[length[row] :]
                length[row] = len(table)
        return rows[index, :width]


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(
                "config key 'device': 'cuda' requested but no CUDA device is available"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, hf_config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    ckpt = (
        DTYPES.get(str(ckpt).replace("torch.", ""), torch.float32)
        if ckpt is not None
        else torch.float32
    )
    return ckpt if ckpt != torch.float32 else torch.bfloat16


class ModelRunner:
    # cascade attention (a decode step's shared prefix read once for all its sequences): from
    # this many sequences sharing at least this many keys; fewer gain less than the merge costs
    cascade_min_seqs = 16
    cascade_min_tokens = 256

    def __init__(
        self,
        config: EngineConfig,
        hf_config,
        model_path: str | None,
        device: torch.device | None = None,
    ):
        self.config = config
        self.hf_config = hf_config
        self.device = device or resolve_device(config)
        self.dtype = resolve_dtype(config, hf_config, self.device)
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len
        torch.manual_seed(config.seed)

        model_cls = get_model_class(hf_config)
        with torch.device(self.device):
            self.model = model_cls(hf_config, dtype=self.dtype)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, model_path)
        self.model.eval()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = get_backend(config.attention_backend, self.device, config.block_size)
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        # (batch size, cascade) -> (CUDA graph, its logits); filled on CUDA
        self.graphs: dict[tuple[int, bool], tuple] = {}
        self.graph_sizes: list[int] = []
        # steps with prefill tokens: padded token count -> (CUDA graph, its hidden states)
        self.mixed_graphs: dict[int, tuple] = {}
        self.static: dict[str, torch.Tensor] = {}  # the graphs' input buffers
        self.static_shared: SharedPrefix | None = None  # the cascade graphs' too
        self.supports_overlap = True  # the engine may launch a step before reading the last one
        self._staging: list[torch.Tensor | None] = [
            None,
            None,
        ]  # pinned host buffers for step inputs
        self._copied = (
            [torch.cuda.Event(), torch.cuda.Event()] if self.device.type == "cuda" else []
        )
        self._turn = 0
        self.block_tables = BlockTableRows(2 * config.max_num_seqs)
        _LIVE_RUNNERS.add(self)

    def device_bytes(self) -> int:
        """Device memory this runner holds in weights and KV pool (0 once closed)."""
        weights = (
            0
            if self.model is None
            else sum(p.numel() * p.element_size() for p in self.model.parameters())
        )
        return weights + (0 if self.kv_cache is None else self.kv_cache.nbytes)

    # ---- KV pool -------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        a = self.attn_layers[0]
        return (
            2
            * len(self.attn_layers)
            * self.block_size
            * a.num_kv_heads
            * a.head_dim
            * self.dtype.itemsize
        )

    def default_num_blocks(self) -> int:
        """On CUDA: what ``gpu_memory_utilization`` leaves after weights and a warm-up step.
        On CPU: room for 8,192 tokens, or two sequences of ``max_model_len``."""
        if self.device.type == "cuda":
            self.warm_up()
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_reserved(self.device)
            budget = total * self.config.gpu_memory_utilization - used_by_others
            budget -= torch.cuda.max_memory_allocated(self.device)
            num = int(budget // self.kv_bytes_per_block())
            if num < 1:
                raise RuntimeError(self._no_kv_memory_message())
            return num
        tokens = max(2 * self.max_model_len, 8192)
        return (tokens + self.block_size - 1) // self.block_size

    def _no_kv_memory_message(self) -> str:
        held = bytes_held_by_other_engines(self)
        if held:
            return (
                f"no GPU memory left for the KV cache: an engine in this process holds "
                f"{held / 1e9:.1f} GB: call llm.close() or use `with LLM(...) as llm:`"
            )
        return "no GPU memory left for the KV cache; raise gpu_memory_utilization"

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.attn_layers[0]
        shape = (2, len(self.attn_layers), num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            layer.backend = self.backend
        self.num_blocks = num_blocks
        if self.device.type == "cuda":
            self.warm_up_kernels()
            if not self.config.enforce_eager and self.backend.supports_cuda_graphs:
                self.capture_cuda_graphs()

    def warm_up(self) -> None:
        """One forward pass over a full token budget without a KV pool, to measure peak
        activation memory."""
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(self.warm_up_step())
        torch.cuda.synchronize(self.device)

    def warm_up_step(self) -> StepInput:
        """A full-budget prefill that needs no KV pool: every logical block maps to one scratch
        block. The table must cover the whole sequence: a backend that reads keys through it
        (fp32 prefill) would otherwise read past its row."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        seq_len = min(num_tokens, self.max_model_len)
        num_seqs = max(1, num_tokens // seq_len)
        a = self.attn_layers[0]
        scratch = torch.zeros(
            (1, self.block_size, a.num_kv_heads, a.head_dim), dtype=self.dtype, device=self.device
        )
        for layer in self.attn_layers:
            layer.k_cache, layer.v_cache, layer.backend = scratch, scratch, self.backend
        return self.block_zero_step([seq_len] * num_seqs, [seq_len] * num_seqs, num_decodes=0)

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Run a step of each kind requests make, so that every kernel variant they can choose
        is compiled here and not inside a user's first ``generate``. Triton compiles a binary per
        kernel and constexpr set (the decode split count among them); argument values that
        change from step to step are kept out of its key (``do_not_specialize``). The steps:
        a fresh prefill; a decode next to a prefill chunk after cached context (chunked
        prefill, prefix-cache hits, the paged prefill kernel); one decode per doubling of the
        context, since the decode kernel's split count grows with it; one with cascade attention
        (always one split). Needs the KV pool."""
        steps = [
            self.block_zero_step([3, 2], [3, 2], num_decodes=0),
            self.block_zero_step([1, 3], [2, 5], num_decodes=1),
        ]
        m = self.max_model_len
        steps += [
            self.block_zero_step([1], [n], num_decodes=1)
            for n in sorted({min(1 << k, m) for k in range(m.bit_length() + 1)})
        ]
        if (
            self.backend.supports_shared_prefix and m > self.block_size
        ):  # cascade attention: one split
            steps.append(self.block_zero_step([1], [m], num_decodes=1))
            steps[-1].shared_len = self.block_size
            steps[-1].shared_rows, steps[-1].shared_blocks = (
                np.ones(1, np.int32),
                np.zeros(1, np.int32),
            )
        for step in steps:
            self.execute(step)
        # the fused MoE kernels' launch config follows the token count: compile every bucket's
        # (the steps above met the model's expert shapes)
        from vllm_lite.layers.fused_moe import warm_up_fused_moe

        warm_up_fused_moe(self.config.max_num_batched_tokens)
        # the sampler's kernels: logprobs read the model's logits; sampling reads them, or their
        # fp32 copy where penalties, bias or banned tokens changed them
        from vllm_lite.layers.fused_ops import gumbel_sample, token_logprobs

        index = torch.zeros(1, dtype=torch.int64, device=self.device)
        token_logprobs(torch.zeros((1, 16), dtype=self.dtype, device=self.device), index, index, 1)
        for dtype in {self.dtype, torch.float32}:
            gumbel_sample(
                torch.zeros((1, 16), dtype=dtype, device=self.device),
                torch.ones(1, device=self.device),
                index,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block_zero_step(
        self, query_lens: list[int], seq_lens: list[int], num_decodes: int
    ) -> StepInput:
        """A step that belongs to no request: every logical block of every table is block 0 and
        nothing is written (slot -1), so it leaves the KV pool as it was."""
        q_lens, ends = np.asarray(query_lens, np.int64), np.asarray(seq_lens, np.int64)
        qsl = np.zeros(len(q_lens) + 1, np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        num_tokens, max_seq_len = int(qsl[-1]), int(ends.max())
        return StepInput(
            input_ids=np.zeros(num_tokens, np.int64),
            positions=np.concatenate([np.arange(e - q, e) for q, e in zip(q_lens, ends)]),
            slot_mapping=np.full(num_tokens, -1, np.int64),
            query_start_loc=qsl.astype(np.int32),
            seq_lens=ends.astype(np.int32),
            block_tables=np.zeros((len(q_lens), -(-max_seq_len // self.block_size)), np.int32),
            logits_indices=qsl[1:] - 1,
            num_decodes=num_decodes,
            max_query_len=int(q_lens.max()),
            max_seq_len=max_seq_len,
            prefill_is_fresh=bool((q_lens == ends)[num_decodes:].all()),
        )

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """The step's arrays. Python passes gather per-sequence scalars and token ids, block
        tables come from rows kept between steps (``BlockTableRows``), the rest is vectorized
        (this runs every step for up to 256 sequences on the host)."""
        bs, seqs, counts = self.block_size, batch.seqs, batch.num_new_tokens
        num_seqs, num_decodes = len(seqs), batch.num_decodes
        starts = np.array([s.num_computed_tokens for s in seqs], np.int64)
        input_ids = [
            s.token_ids[s.num_computed_tokens] for s in seqs[:num_decodes]
        ]  # decodes come first
        for seq, n in zip(seqs[num_decodes:], counts[num_decodes:]):
            input_ids.extend(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n])
        lengths = np.array([len(s.token_ids) for s in seqs], np.int64)
        n_new = np.asarray(counts, np.int64)
        ends = starts + n_new
        qsl = np.zeros(num_seqs + 1, np.int64)
        np.cumsum(n_new, out=qsl[1:])
        seq_index = np.repeat(np.arange(num_seqs), n_new)
        pos = np.arange(qsl[-1]) - qsl[seq_index] + starts[seq_index]
        block_tables = self.block_tables.gather(seqs)
        slot_mapping = block_tables[seq_index, pos // bs].astype(np.int64) * bs + pos % bs
        shared = (0, None, None)
        if self.backend.supports_shared_prefix and num_decodes == num_seqs >= self.cascade_min_seqs:
            shared = self.shared_prefix(block_tables, ends)
        ids = np.asarray(input_ids, np.int64)
        prev_index = None
        is_hole = ids < 0
        if is_hole.any():
            inflight = np.array([s.inflight_index for s in seqs], np.int64)
            prev_index = np.where(is_hole, inflight[seq_index], -1)
        return StepInput(
            input_ids=ids,
            positions=pos,
            slot_mapping=slot_mapping,
            prev_index=prev_index,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=ends.astype(np.int32),
            block_tables=block_tables,
            logits_indices=(qsl[1:] - 1)[ends == lengths],
            num_decodes=num_decodes,
            max_query_len=int(n_new.max()),
            max_seq_len=int(ends.max()),
            prefill_is_fresh=not bool((starts[num_decodes:] > 0).any()),
            shared_len=shared[0],
            shared_rows=shared[1],
            shared_blocks=shared[2],
        )

    def shared_prefix(self, block_tables: np.ndarray, seq_lens: np.ndarray):
        """Cascade attention's (keys, rows [B] int32 1/0, blocks) for a decode step, or (0,
        None, None). The rows: those whose first block is the most common first block (prefix
        caching, or the n completions of one prompt, share physical blocks), when there are at
        least ``cascade_min_seqs``; the keys: the whole blocks all of them have in common before
        each one's last key (which this step writes), when at least ``cascade_min_tokens``."""
        none = (0, None, None)
        firsts, counts = np.unique(block_tables[:, 0], return_counts=True)
        if counts.max() < self.cascade_min_seqs:
            return none
        rows = block_tables[:, 0] == firsts[counts.argmax()]
        tables = block_tables[rows]
        limit = (int(seq_lens[rows].min()) - 1) // self.block_size
        same = (tables[:, :limit] == tables[0, :limit]).all(axis=0)
        shared = (limit if same.all() else int(same.argmin())) * self.block_size
        if shared < self.cascade_min_tokens:
            return none
        return shared, rows.astype(np.int32), tables[0, : shared // self.block_size]

    def _upload(self, step: StepInput) -> dict[str, torch.Tensor]:
        """The step's arrays on the device. On CUDA they are packed into a pinned buffer and
        sent with one host-to-device copy; two buffers alternate, so the host can fill one
        while the copy from the other may still be queued behind a running step."""
        names = [
            "input_ids",
            "positions",
            "slot_mapping",
            "query_start_loc",
            "seq_lens",
            "block_tables",
            "logits_indices",
        ]
        names += [
            n for n in ("prev_index", "decode_lens", "prefill_work") if getattr(step, n) is not None
        ]
        arrays = [getattr(step, n) for n in names]
        if step.shared_len:
            names += ["shared_len", "shared_rows", "shared_blocks"]
            arrays += [np.array([step.shared_len], np.int32), step.shared_rows, step.shared_blocks]
        if self.device.type != "cuda":
            return {n: torch.from_numpy(a) for n, a in zip(names, arrays)}
        total = sum(a.size for a in arrays)
        self._turn ^= 1
        staging, copied = self._staging[self._turn], self._copied[self._turn]
        if staging is None or staging.numel() < total:
            staging = self._staging[self._turn] = torch.empty(
                2 * total, dtype=torch.int64, pin_memory=True
            )
        copied.synchronize()
        host, offset = staging.numpy(), 0
        for a in arrays:
            host[offset : offset + a.size] = a.ravel()
            offset += a.size
        packed = staging[:total].to(self.device, non_blocking=True)
        copied.record()
        out, offset = {}, 0
        for n, a in zip(names, arrays):
            t = packed[offset : offset + a.size].view(a.shape)
            out[n] = t if a.dtype == np.int64 else t.to(torch.int32)
            offset += a.size
        return out

    @torch.inference_mode()
    def execute(self, step: StepInput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on one step; returns the logits of the rows in ``logits_indices``.
        ``prev_tokens``: the previous step's sampled tokens, for placeholder token ids."""
        num_tokens = len(step.input_ids)
        mixed = self.mixed_graph_shape(step)
        if mixed is not None:
            step = self.graph_layout(step, *mixed)
        dev = self._upload(step)
        if step.prev_index is not None:
            prev = dev["prev_index"]
            dev["input_ids"] = torch.where(
                prev >= 0, prev_tokens[prev.clamp(min=0)], dev["input_ids"]
            )
        if self.graphs and step.num_decodes == num_tokens and num_tokens <= self.graph_sizes[-1]:
            return self._replay(step, dev)
        if mixed is not None:
            return self._replay_mixed(step, dev, *mixed)
        meta = AttentionMetadata(
            slot_mapping=dev["slot_mapping"],
            query_start_loc=dev["query_start_loc"],
            seq_lens=dev["seq_lens"],
            block_tables=dev["block_tables"],
            num_decodes=step.num_decodes,
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            prefill_is_fresh=step.prefill_is_fresh,
            shared_prefix=SharedPrefix(dev["shared_len"], dev["shared_blocks"], dev["shared_rows"])
            if step.shared_len
            else None,
            query_start_loc_cpu=step.query_start_loc.tolist(),
            seq_lens_cpu=step.seq_lens.tolist(),
            decode_lens=dev.get("decode_lens"),
            prefill_work=dev.get("prefill_work"),
        )
        with forward_context(meta):
            hidden = self.model(dev["input_ids"], dev["positions"])
        return self.model.compute_logits(hidden[dev["logits_indices"]])

    def drop_cuda_graphs(self) -> None:
        """Forget the captured graphs (before a tensor-parallel group is torn down: NCCL's
        teardown hangs while graphs that captured its collectives are alive). Decode steps run
        eagerly afterwards."""
        self.graphs, self.mixed_graphs, self.static, self.static_shared = {}, {}, {}, None

    def close(self) -> None:
        """Drop the graphs, the KV pool and the weights so their device memory can be reused."""
        self.drop_cuda_graphs()
        self.kv_cache = None
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- CUDA graphs ---------------------------------------------------------------------
    def cuda_graph_batch_sizes(self) -> list[int]:
        max_bs = min(self.config.max_num_seqs, 512)
        return [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]

    # mixed steps above this many tokens run eagerly
    mixed_graph_max_tokens = 2048

    def mixed_graph_token_sizes(self) -> list[int]:
        """Token counts captured for steps with prefill tokens: 16 to 512 by doubling, then every
        256 up to 2,048, then every 1,024, within the token budget and mixed_graph_max_tokens."""
        sizes = (
            [16, 32, 64, 128, 256]
            + list(range(512, 2048, 256))
            + list(range(2048, 65536 + 1, 1024))
        )
        limit = min(self.config.max_num_batched_tokens, self.mixed_graph_max_tokens)
        return [t for t in sizes if t <= limit]

    def mixed_graph_seqs(self, num_tokens: int) -> int:
        """The sequence rows of the mixed graph of ``num_tokens`` tokens."""
        return min(num_tokens, self.config.max_num_seqs)

    def mixed_graph_shape(self, step: StepInput) -> tuple[int, int] | None:
        """(tokens, sequences) of the captured mixed graph that runs ``step``, or None: a step
        of decodes only has its own graphs, and one too large runs eagerly."""
        num_tokens = len(step.input_ids)
        if not self.mixed_graphs or step.num_decodes == num_tokens or step.prefill_work is not None:
            return None
        size = next((t for t in self.mixed_graphs if t >= num_tokens), None)
        if size is None or len(step.seq_lens) > self.mixed_graph_seqs(size):
            return None
        return size, self.mixed_graph_seqs(size)

    def graph_layout(self, step: StepInput, num_tokens: int, num_seqs: int) -> StepInput:
        """``step`` as a mixed graph of ``num_tokens`` tokens and ``num_seqs`` sequence rows
        runs it: padding tokens write nowhere (slot -1) and belong to no sequence; the decodes'
        lengths and the prefill kernel's work list stand for the host values (number of
        decodes, longest query) that an eager step's kernel launches read."""
        from vllm_lite.attention.triton_ops import prefill_work, prefill_work_capacity

        pad, nd, qsl = num_tokens - len(step.input_ids), step.num_decodes, step.query_start_loc
        decode_lens = np.zeros(num_seqs, np.int32)
        decode_lens[:nd] = step.seq_lens[:nd]
        return dataclasses.replace(
            step,
            input_ids=np.pad(step.input_ids, (0, pad)),
            positions=np.pad(step.positions, (0, pad)),
            slot_mapping=np.pad(step.slot_mapping, (0, pad), constant_values=-1),
            prev_index=None
            if step.prev_index is None
            else np.pad(step.prev_index, (0, pad), constant_values=-1),
            query_start_loc=np.pad(qsl, (0, num_seqs + 1 - len(qsl)), mode="edge"),
            seq_lens=np.pad(step.seq_lens, (0, num_seqs - len(step.seq_lens))),
            decode_lens=decode_lens,
            prefill_work=prefill_work(
                np.diff(qsl[nd:]), nd, prefill_work_capacity(num_tokens, num_seqs)
            ),
        )

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture one graph of a whole decode step (model + LM head) per batch size; a step is
        padded up to the next captured size. Padding rows write nowhere (slot -1). Batches of
        at least ``cascade_min_seqs`` get a second graph with cascade attention. With a backend
        that supports it, steps with prefill tokens get graphs too (``mixed_graph_token_sizes``:
        the model without the LM head, which runs on the sampled rows only). All graphs read
        one set of input buffers and share one memory pool."""
        from vllm_lite.attention.triton_ops import prefill_work_capacity

        gc.collect()  # garbage freed now, not by a collection inside a capture (_capture)
        self.graph_sizes = self.cuda_graph_batch_sizes()
        max_bs = self.graph_sizes[-1]
        mixed_sizes = (
            self.mixed_graph_token_sizes() if self.backend.supports_mixed_cuda_graphs else []
        )
        max_tokens = max([max_bs] + mixed_sizes)
        max_seqs = max([max_bs] + [self.mixed_graph_seqs(t) for t in mixed_sizes])
        max_work = max(
            [0] + [prefill_work_capacity(t, self.mixed_graph_seqs(t)) for t in mixed_sizes]
        )
        max_blocks = (self.max_model_len + self.block_size - 1) // self.block_size
        dev = self.device
        self.static = st = {
            "input_ids": torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_tokens, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((max_tokens,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.ones(max_seqs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=dev),
            "query_start_loc": torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev),
            "decode_lens": torch.zeros(max_seqs, dtype=torch.int32, device=dev),
            "prefill_work": torch.full((max_work, 2), -1, dtype=torch.int32, device=dev),
        }
        shared = SharedPrefix(
            length=torch.zeros(1, dtype=torch.int32, device=dev),
            blocks=torch.zeros(max_blocks, dtype=torch.int32, device=dev),
            rows=torch.zeros(max_bs, dtype=torch.int32, device=dev),
        )
        self.static_shared = shared
        self.graphs, self.mixed_graphs, pool = {}, {}, None
        for t in reversed(mixed_sizes):  # the largest first: the smaller ones reuse its memory
            b = self.mixed_graph_seqs(t)
            meta = AttentionMetadata(
                st["slot_mapping"][:t],
                st["query_start_loc"][: b + 1],
                st["seq_lens"][:b],
                st["block_tables"][:b],
                num_decodes=0,
                max_query_len=t,
                max_seq_len=self.max_model_len,
                decode_lens=st["decode_lens"][:b],
                prefill_work=st["prefill_work"][: prefill_work_capacity(t, b)],
            )
            graph, hidden = self._capture(
                meta, lambda t=t: self.model(st["input_ids"][:t], st["positions"][:t]), pool
            )
            pool = graph.pool()
            self.mixed_graphs[t] = (graph, hidden)
        self.mixed_graphs = dict(sorted(self.mixed_graphs.items()))
        query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        for bs in reversed(self.graph_sizes):
            cascades = [False] + [True] * (
                self.backend.supports_shared_prefix and bs >= self.cascade_min_seqs
            )
            for cascade in cascades:
                meta = AttentionMetadata(
                    st["slot_mapping"][:bs],
                    query_start_loc[: bs + 1],
                    st["seq_lens"][:bs],
                    st["block_tables"][:bs],
                    num_decodes=bs,
                    max_query_len=1,
                    max_seq_len=self.max_model_len,
                    shared_prefix=SharedPrefix(shared.length, shared.blocks, shared.rows[:bs])
                    if cascade
                    else None,
                )
                graph, logits = self._capture(
                    meta,
                    lambda bs=bs: self.model.compute_logits(
                        self.model(st["input_ids"][:bs], st["positions"][:bs])
                    ),
                    pool,
                )
                pool = graph.pool()
                self.graphs[bs, cascade] = (graph, logits)
        torch.cuda.synchronize(dev)

    @staticmethod
    def _capture(meta: AttentionMetadata, run, pool) -> tuple:
        """Run ``run`` once (warm-up), then capture it into a graph; returns (graph, output)."""
        with forward_context(meta):
            run()
            graph = torch.cuda.CUDAGraph()
            # no collection during the capture: freeing another engine's garbage there (its
            # pinned buffers, events) makes CUDA calls a capture forbids, and it fails
            enabled = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool):
                    out = run()
            finally:
                if enabled:
                    gc.enable()
        return graph, out

    def _replay(self, step: StepInput, dev: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(step.input_ids)
        bs = next(b for b in self.graph_sizes if b >= n)
        st = self.static
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            st[name][:n].copy_(dev[name])
        st["slot_mapping"][n:bs].fill_(-1)
        st["seq_lens"][n:bs].fill_(1)
        st["block_tables"][:n, : step.block_tables.shape[1]].copy_(dev["block_tables"])
        cascade = step.shared_len > 0 and (bs, True) in self.graphs
        if cascade:
            shared = self.static_shared
            shared.length.copy_(dev["shared_len"])
            shared.rows[:n].copy_(dev["shared_rows"])
            shared.rows[n:bs].fill_(0)
            shared.blocks[: len(step.shared_blocks)].copy_(dev["shared_blocks"])
        graph, logits = self.graphs[bs, cascade]
        graph.replay()
        return logits[:n] if len(step.logits_indices) == n else logits[dev["logits_indices"]]

    def _replay_mixed(
        self, step: StepInput, dev: dict[str, torch.Tensor], num_tokens: int, num_seqs: int
    ):
        """``step`` is already in the graph's layout (``graph_layout``): its arrays fill the
        input buffers' first rows; the rows past them are never read."""
        st = self.static
        for name in (
            "input_ids",
            "positions",
            "slot_mapping",
            "query_start_loc",
            "seq_lens",
            "decode_lens",
            "prefill_work",
        ):
            st[name][: len(dev[name])].copy_(dev[name])
        rows, width = step.block_tables.shape
        st["block_tables"][:rows, :width].copy_(dev["block_tables"])
        graph, hidden = self.mixed_graphs[num_tokens]
        graph.replay()
        return self.model.compute_logits(hidden[dev["logits_indices"]])
