"""Property test of the block manager with the prefix cache: random streams of add, step,
finish, abort and preempt drive a Scheduler and BlockManager the way the engine does (the model
replaced by a record of which sequence wrote each KV slot, sampled tokens read back one step
late as in the overlapped engine, n > 1 requests forking their completions), and after every
operation the books must balance and every sequence must read only KV of its own tokens."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.scheduler import Scheduler
from vllm_lite.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from vllm_lite.sampling_params import SamplingParams

BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 2, 14, 20
# Tokens 1 and 2 only: prompts often share a prefix (cache hits), and equal blocks often follow
# different prefixes (which must never hit). Half the prompts extend a piece of one long stem.
STEM = [1, 2, 2, 1, 1, 1, 2, 2, 2, 1]
tokens = st.lists(st.integers(1, 2), min_size=1, max_size=8)
prompts = st.one_of(tokens, st.builds(lambda k, tail: STEM[:k] + tail, st.integers(2, 10), tokens))


class PrefixCachingMachine(RuleBasedStateMachine):
    enable_prefix_caching = True

    @initialize()
    def start(self):
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, self.enable_prefix_caching)
        self.sched = Scheduler(
            self.bm, max_num_seqs=5, max_num_batched_tokens=7, max_model_len=MAX_MODEL_LEN
        )
        self.seqs: list[Sequence] = []  # every sequence ever made
        self.inflight: list[tuple[Sequence, int]] = []  # (sequence, position of its placeholder)
        self.writer: dict[
            int, tuple[Sequence, int]
        ] = {}  # KV slot -> (sequence, position) that wrote it
        self.next_token = 0

    # ---- the engine's moves ---------------------------------------------------------------
    @rule(prompt=prompts, n=st.integers(1, 3))
    def add(self, prompt, n):
        seq = Sequence(prompt, SamplingParams(n=n))
        self.sched.add(seq)
        self.seqs.append(seq)

    @rule()
    def step(self):
        """Schedule and launch (write KV, key full blocks, fork, sample a placeholder), then read
        back the previous step's tokens, as LLMEngine.step does."""
        batch = self.sched.schedule()
        previous, self.inflight = self.inflight, []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.writer[self.bm.slot(seq, p)] = (seq, p)
            samples = seq.num_computed_tokens + n == len(seq)
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq)
            if samples:
                family = [seq]
                while seq.needs_fork:
                    child = seq.fork()
                    num_full = seq.num_prompt_tokens // BLOCK_SIZE
                    self.bm.share(child, seq.block_table[:num_full])
                    child.num_computed_tokens = num_full * BLOCK_SIZE
                    self.sched.add_forked(child)
                    self.seqs.append(child)
                    family.append(child)
                for s in family:
                    self.inflight.append((s, len(s.token_ids)))
                    s.token_ids.append(PLACEHOLDER)
        for seq, pos in previous:
            if seq.is_finished:
                continue
            seq.token_ids[pos] = self.next_token % 2 + 1
            self.next_token += 1
            if seq.at_length_limit(pos + 1, MAX_MODEL_LEN):
                del seq.token_ids[pos + 1 :]
                self.sched.finish(seq, "length")

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.sched.running))
        while seq.token_ids[-1] == PLACEHOLDER and len(seq.token_ids) > seq.num_prompt_tokens:
            seq.token_ids.pop()  # the stop token came before the one in flight
        self.sched.finish(seq, "stop")

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(list(self.sched.waiting) + self.sched.running))
        for s in seq.group:
            if not s.is_finished:
                self.sched.finish(s, "abort")

    @precondition(lambda self: self.sched.running)
    @rule()
    def preempt(self):
        self.sched._preempt(self.sched.running.pop())

    # ---- the books --------------------------------------------------------------------------
    def holders(self):
        held: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), "a table holds a block twice"
            if seq.block_table:
                assert seq.status == SequenceStatus.RUNNING, "only running sequences hold blocks"
            for i, block in enumerate(seq.block_table):
                held.setdefault(block, []).append((seq, i))
        return held

    @invariant()
    def reference_counts_equal_holders(self):
        held = self.holders()
        assert self.bm.ref_counts == [len(held.get(b, ())) for b in range(NUM_BLOCKS)]

    @invariant()
    def free_cached_and_used_make_the_pool(self):
        used = {b for b in range(NUM_BLOCKS) if self.bm.ref_counts[b]}
        free = set(self.bm.free_blocks)
        assert len(free) == len(self.bm.free_blocks) and not free & used
        assert len(free) + len(used) == NUM_BLOCKS
        cached = set(self.bm.cached_blocks.values())
        assert len(cached) == len(self.bm.cached_blocks)  # one block per key
        for key, block in self.bm.cached_blocks.items():
            assert self.bm.block_key[block] == key and self.bm.block_prefix[block]
            assert PLACEHOLDER not in key[1], "a block keyed before its last token was read back"
        assert sum(k is not None for k in self.bm.block_key) == len(cached)
        assert self.bm.num_cached_free_blocks == len(cached & free)  # the trace's cached-free count
        if not self.enable_prefix_caching:
            assert not cached and not any(self.bm.block_prefix)

    @invariant()
    def a_shared_block_holds_the_same_tokens_for_every_holder(self):
        bs = BLOCK_SIZE
        for block, owners in self.holders().items():
            if len(owners) > 1:
                assert len({i for _, i in owners}) == 1, "a shared block at different places"
                i = owners[0][1]
                assert len({tuple(s.token_ids[: (i + 1) * bs]) for s, _ in owners}) == 1
                assert PLACEHOLDER not in owners[0][0].token_ids[: (i + 1) * bs]
                if self.enable_prefix_caching:
                    assert self.bm.block_prefix[block], "shared but not under a key"

    @invariant()
    def a_sequences_keyed_blocks_lead_its_table(self):
        for seq in self.seqs:
            assert (
                seq.num_cached_blocks * BLOCK_SIZE <= seq.num_computed_tokens or not seq.block_table
            )
            assert all(self.bm.block_prefix[b] for b in seq.block_table[: seq.num_cached_blocks])

    @invariant()
    def every_sequence_reads_kv_of_its_own_tokens(self):
        for seq in self.sched.running:
            for p in range(min(seq.num_computed_tokens, len(seq.token_ids))):
                writer, q = self.writer[self.bm.slot(seq, p)]
                assert q == p
                if writer is not seq:
                    assert writer.token_ids[: p + 1] == seq.token_ids[: p + 1], (
                        "KV of another prefix"
                    )

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for seq in list(self.sched.waiting) + list(self.sched.running):
            self.sched.finish(seq, "abort")
        assert self.bm.num_free_blocks == NUM_BLOCKS and not any(self.bm.ref_counts), (
            "blocks leaked"
        )


class NoPrefixCachingMachine(PrefixCachingMachine):
    enable_prefix_caching = False


SETTINGS = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestPrefixCaching = PrefixCachingMachine.TestCase
TestPrefixCaching.settings = SETTINGS
TestNoPrefixCaching = NoPrefixCachingMachine.TestCase
TestNoPrefixCaching.settings = settings(SETTINGS, max_examples=30)
