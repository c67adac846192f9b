from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.scheduler import Scheduler
from vllm_lite.engine.sequence import Sequence
from vllm_lite.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32):
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget)


def add(sched, n):
    s = Sequence(list(range(n)), SamplingParams())
    sched.add(s)
    return s


def advance(batch, new_token=7):
    """What the engine does after the model ran: tokens computed, a token sampled at the end."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == len(s):
            s.token_ids.append(new_token)


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    sched = make(budget=10)
    s = add(sched, 25)
    sizes = []
    while s.num_computed_tokens < 25:
        batch = sched.schedule()
        sizes.append(batch.num_new_tokens[0])
        advance(batch)
    assert sizes == [10, 10, 5]


def test_step_mixes_decodes_first_with_prefill_chunks_under_the_budget():
    sched = make(budget=12)
    a = add(sched, 4)
    advance(sched.schedule())  # a prefilled, now decoding
    b = add(sched, 30)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 11]
    assert batch.num_decodes == 1 and batch.num_tokens <= 12


def test_max_num_seqs_caps_running_sequences():
    sched = make(max_seqs=2)
    for _ in range(3):
        add(sched, 3)
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_a_request_of_n_completions_is_admitted_only_with_n_free_seats():
    sched = make(max_seqs=4)
    a = Sequence(list(range(3)), SamplingParams(n=3))
    sched.add(a)
    b, c = add(sched, 3), add(sched, 3)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and list(sched.waiting) == [
        c
    ]  # a keeps 3 seats for its completions


def test_pool_exhaustion_preempts_the_most_recently_admitted_sequence():
    sched = make(num_blocks=3, block_size=4, budget=64)
    old, new = add(sched, 4), add(sched, 8)
    advance(sched.schedule())  # old holds 1 block, new holds 2: pool full
    batch = sched.schedule()  # old needs a second block for its decode token
    assert batch.seqs == [old]
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.waiting[0] is new
    assert sched.num_preemptions == 1


def test_finish_returns_blocks_immediately():
    sched = make()
    s = add(sched, 9)
    advance(sched.schedule())
    sched.finish(s, "stop")
    assert sched.block_manager.num_free_blocks == 64 and not sched.has_unfinished()
