import pytest

from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.sequence import PLACEHOLDER, Sequence
from vllm_lite.sampling_params import SamplingParams


def seq(n):
    return Sequence(list(range(n)), SamplingParams())


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_allocate_gives_each_sequence_enough_distinct_blocks(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    a, b = seq(3 * block_size + 1), seq(block_size)
    bm.allocate(a, len(a))
    bm.allocate(b, len(b))
    assert len(a.block_table) == 4 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 5
    assert bm.num_free_blocks == 59


@pytest.mark.parametrize("block_size", [16, 256])
def test_a_new_block_is_taken_only_when_crossing_a_block_boundary(block_size):
    bm = BlockManager(num_blocks=8, block_size=block_size)
    s = seq(block_size - 1)
    bm.allocate(s, len(s))
    bm.allocate(s, block_size)  # fills the last slot of block 0
    assert len(s.block_table) == 1
    bm.allocate(s, block_size + 1)
    assert len(s.block_table) == 2


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(17)
    bm.allocate(s, 17)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 10
    assert sorted(bm.free_blocks) == list(range(10))


def test_allocation_beyond_the_pool_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(9)
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(s, 9)
    assert bm.num_free_blocks == 2


def test_slot_maps_logical_position_through_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(6)
    bm.free_blocks.move_to_end(0)  # physical blocks are not in logical order
    bm.allocate(s, 6)
    assert s.block_table == [1, 2]
    assert [bm.slot(s, p) for p in range(6)] == [
        s.block_table[p // 4] * 4 + p % 4 for p in range(6)
    ]


def test_shared_blocks_return_to_the_pool_when_their_last_holder_frees_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent, child = seq(10), seq(10)
    bm.allocate(parent, 10)  # 3 blocks, the last one partial
    bm.share(child, parent.block_table[:2])  # the two full blocks
    assert child.block_table == parent.block_table[:2] and bm.num_free_blocks == 7
    bm.allocate(child, 11)  # its own third block
    assert child.block_table[2] not in parent.block_table and bm.num_free_blocks == 6
    bm.free(parent)
    assert bm.num_free_blocks == 7  # only the parent's own block came back
    bm.free(child)
    assert (
        bm.num_free_blocks == 10
        and sorted(bm.free_blocks) == list(range(10))
        and not any(bm.ref_counts)
    )


# ---- the prefix cache -------------------------------------------------------------------------
def computed(tokens, bm=None):
    """A sequence of ``tokens`` whose K/V are all computed (and keyed, given ``bm``)."""
    s = Sequence(tokens, SamplingParams())
    if bm is not None:
        bm.allocate(s, len(s))
        s.num_computed_tokens = len(s)
        bm.cache_full_blocks(s)
    return s


def test_a_new_sequence_finds_every_leading_full_block_of_the_same_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(list(range(10)), bm)  # blocks [0..3], [4..7] full; [8, 9] partial
    b = Sequence(list(range(8)) + [50, 51, 52, 53, 54], SamplingParams())
    assert bm.find_cached_prefix(b) == a.block_table[:2]
    assert bm.find_cached_prefix(Sequence([9] + list(range(1, 13)), SamplingParams())) == []


def test_the_last_token_is_never_found_cached():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(list(range(12)), bm)  # three full blocks
    assert bm.find_cached_prefix(Sequence(list(range(12)), SamplingParams())) == a.block_table[:2]
    assert bm.find_cached_prefix(Sequence(list(range(13)), SamplingParams())) == a.block_table


def test_a_block_is_keyed_with_its_whole_prefix_not_only_its_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    computed([1, 1, 1, 1, 7, 7, 7, 7], bm)
    other_start = Sequence([2, 2, 2, 2, 7, 7, 7, 7, 9], SamplingParams())
    assert bm.find_cached_prefix(other_start) == []


def test_a_hash_collision_never_returns_another_prefixs_blocks():
    bm = BlockManager(num_blocks=16, block_size=2)
    computed([0, 0, 5], bm)
    twin = 2**61 - 1  # hash(twin) == hash(0): the keys' hashes collide
    assert hash((0, (twin, twin))) == hash((0, (0, 0)))
    assert bm.find_cached_prefix(Sequence([twin, twin, 5], SamplingParams())) == []


def test_shared_cached_blocks_are_reference_counted_and_stay_cached_when_freed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(list(range(9)), bm)
    b = Sequence(list(range(9)), SamplingParams())
    hit = bm.find_cached_prefix(b)
    assert bm.can_allocate(b, 9, hit)
    bm.share(b, hit)
    bm.allocate(b, 9)
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2, 1] and bm.num_free_blocks == 4
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)
    assert bm.find_cached_prefix(Sequence(list(range(9)), SamplingParams())) == hit


def test_a_cached_free_block_counts_as_taken_when_a_hit_revives_it():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.free(computed(list(range(8)), bm))  # two cached blocks, all 3 free
    s = Sequence(list(range(8)) + [9] * 5, SamplingParams())  # 13 tokens: 4 blocks
    hit = bm.find_cached_prefix(s)
    assert len(hit) == 2
    assert bm.can_allocate(s, 12, hit) and not bm.can_allocate(s, 13, hit)


def test_free_blocks_are_reused_least_recently_used_first_and_a_tail_before_its_prefix():
    bm = BlockManager(num_blocks=6, block_size=4)
    old, new = (
        computed(list(range(8)), bm),
        computed(list(range(100, 108)), bm),
    )  # blocks [0, 1], [2, 3]
    bm.free(old)
    bm.free(new)
    assert list(bm.free_blocks) == [4, 5, 1, 0, 3, 2]
    fresh = computed(list(range(200, 204)), bm)
    assert fresh.block_table == [4]  # a never-used block; every cached prefix survives
    fresh = computed(list(range(300, 304)), bm)
    assert fresh.block_table == [5]
    taken = computed(list(range(400, 404)), bm)  # the pool is out of empty blocks: evict
    assert taken.block_table == [1]  # old's tail, so old's first block is still found
    assert bm.find_cached_prefix(Sequence(list(range(8)), SamplingParams())) == [0]
    assert bm.find_cached_prefix(Sequence(list(range(100, 109)), SamplingParams())) == [2, 3]


def test_a_block_ending_in_a_placeholder_is_keyed_once_the_token_is_read_back():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = computed([1, 2, 3])
    bm.allocate(s, 4)
    s.token_ids.append(PLACEHOLDER)  # sampled, still on the device; its K/V computed next step
    s.num_computed_tokens = 4
    bm.cache_full_blocks(s)
    assert not bm.cached_blocks and s.num_cached_blocks == 0
    s.token_ids[3] = 4
    bm.cache_full_blocks(s)
    assert bm.cached_blocks == {(0, (1, 2, 3, 4)): s.block_table[0]} and s.num_cached_blocks == 1


def test_reset_prefix_cache_refuses_while_blocks_are_in_use_then_forgets_everything():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed([1, 2, 3, 4, 5], bm)
    assert not bm.reset_prefix_cache() and bm.cached_blocks
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert not bm.cached_blocks and not any(bm.block_prefix)
    assert bm.find_cached_prefix(Sequence([1, 2, 3, 4, 5], SamplingParams())) == []


def test_with_caching_off_nothing_is_keyed():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.free(computed([1, 2, 3, 4, 5], bm))
    assert (
        not bm.cached_blocks
        and bm.find_cached_prefix(Sequence([1, 2, 3, 4, 5], SamplingParams())) == []
    )
