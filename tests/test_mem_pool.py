"""hybridpar.radix.mem_pool: request rows, the paged slot allocator, KV buffers, byte accounting."""

import pytest
import torch

from hybridpar.radix.mem_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    kv_bytes_per_token,
    max_tokens_for_budget,
)


def pages_of(slots: torch.Tensor, page_size: int) -> list[int]:
    return sorted(set((slots // page_size).tolist()))


# ---------------------------------------------------------------- ReqToTokenPool
def test_req_to_token_pool_rows():
    pool = ReqToTokenPool(size=3, max_context_len=8)
    assert pool.req_to_token.shape == (3, 8) and pool.req_to_token.dtype == torch.int32
    rows = pool.alloc(2)
    assert rows == [0, 1] and pool.available_size() == 1
    assert pool.alloc(2) is None and pool.available_size() == 1  # all-or-nothing
    pool.free(rows[0])
    with pytest.raises(ValueError, match="double free"):
        pool.free(rows[0])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([7])
    assert sorted(pool.alloc(2)) == [0, 2]
    pool.write(1, 2, torch.tensor([5, 6, 7]))
    assert pool.req_to_token[1, :5].tolist() == [0, 0, 5, 6, 7]
    with pytest.raises(ValueError, match="max_context_len"):
        pool.write(1, 6, torch.tensor([1, 2, 3]))
    pool.write_many([0, 2, 1], [0, 1, 5], [2, 0, 1], torch.tensor([8, 9, 4]))  # one indexed copy
    assert pool.req_to_token[0, :2].tolist() == [8, 9] and pool.req_to_token[1, :6].tolist() == [0, 0, 5, 6, 7, 4]
    assert pool.req_to_token[2].tolist() == [0] * 8
    with pytest.raises(ValueError, match="max_context_len"):
        pool.write_many([0], [7], [2], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="3 slots for 2 positions"):
        pool.write_many([0], [0], [2], torch.tensor([1, 2, 3]))
    pool.clear()
    assert pool.available_size() == 3 and all(pool.is_free(i) for i in range(3))


# ---------------------------------------------------------------- allocator
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_alloc_hands_out_whole_pages_and_never_page_zero(page_size):
    alloc = TokenToKVPoolAllocator(size=8 * page_size, page_size=page_size)
    assert alloc.num_pages == 8 and alloc.available_size() == 8 * page_size
    slots = alloc.alloc(2 * page_size + 1)  # rounds up to three pages
    assert slots.dtype == torch.int64 and len(slots) == 3 * page_size
    assert pages_of(slots, page_size) == [1, 2, 3]
    assert slots.view(-1, page_size).tolist() == [list(range(p * page_size, (p + 1) * page_size)) for p in (1, 2, 3)]
    rest = alloc.alloc(5 * page_size)
    assert 0 not in pages_of(rest, page_size) and alloc.available_size() == 0
    assert alloc.alloc(1) is None  # out of memory -> None


def test_alloc_out_of_memory_changes_nothing_and_free_returns_pages():
    alloc = TokenToKVPoolAllocator(size=16, page_size=4)
    a = alloc.alloc(8)
    assert alloc.alloc(12) is None and alloc.available_size() == 8
    alloc.free(a[:1])  # one slot frees its whole page
    assert alloc.available_size() == 12
    alloc.free(a[4:])
    assert alloc.available_size() == 16
    with pytest.raises(ValueError, match="double free"):
        alloc.free(a[4:5])
    with pytest.raises(ValueError, match="page 0 is reserved"):
        alloc.free(torch.tensor([1]))
    alloc.free(torch.empty(0, dtype=torch.int64))  # no-op
    assert len(alloc.alloc(16)) == 16


def test_free_list_reuses_freed_pages_first():
    alloc = TokenToKVPoolAllocator(size=32, page_size=4)
    first = alloc.alloc(8)
    alloc.free(first)
    assert pages_of(alloc.alloc(8), 4) == pages_of(first, 4)
    alloc.clear()
    assert alloc.available_size() == 32 and pages_of(alloc.alloc(4), 4) == [1]


def test_alloc_extend_continues_the_open_page_then_takes_fresh_pages():
    ps = 4
    alloc = TokenToKVPoolAllocator(size=40, page_size=ps)
    a = alloc.alloc_extend([0], [6], [-1])  # 6 tokens: one full page + 2 slots of the next
    assert len(a) == 6 and a.tolist() == [4, 5, 6, 7, 8, 9]
    assert alloc.available_size() == 40 - 2 * ps
    # two requests: one continues its open page (last slot 9, prefix 6), one starts fresh
    b = alloc.alloc_extend([6, 0], [11, 3], [9, -1])
    assert b[:5].tolist() == [10, 11, 12, 13, 14]  # fills page 2, then page 3 starts
    assert b[5:].tolist() == [16, 17, 18]  # the second request's own fresh page
    assert alloc.num_new_pages([6, 0], [11, 3]) == 2 and alloc.available_size() == 40 - 4 * ps
    with pytest.raises(ValueError, match="offset pos % page_size"):
        alloc.alloc_extend([6], [7], [12])  # slot 12 cannot hold position 5
    before = alloc.available_size()
    assert alloc.alloc_extend([0], [before + 1], [-1]) is None and alloc.available_size() == before
    assert alloc.alloc_extend([4], [4], [7]).numel() == 0


def test_alloc_decode_takes_a_new_page_exactly_at_page_boundaries():
    ps = 4
    alloc = TokenToKVPoolAllocator(size=16, page_size=ps)
    row = alloc.alloc_extend([0], [3], [-1]).tolist()  # positions 0..2 in page 1
    for seq_len in range(4, 10):  # decode positions 3..8
        free_before = alloc.available_size()
        slot = alloc.alloc_decode([seq_len], [row[-1]])
        assert slot.shape == (1,) and slot.item() % ps == (seq_len - 1) % ps
        opened = (seq_len - 1) % ps == 0
        assert alloc.available_size() == free_before - (ps if opened else 0)
        if not opened:
            assert slot.item() == row[-1] + 1
        row.append(slot.item())
    assert pages_of(torch.tensor(row), ps) == [1, 2, 3]
    alloc.alloc(4)  # last free page gone
    assert alloc.alloc_decode([13], [row[-1]]) is None  # position 12 would need a page


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        TokenToKVPoolAllocator(size=16, page_size=0)
    with pytest.raises(ValueError, match="at least one page"):
        TokenToKVPoolAllocator(size=3, page_size=4)


# ---------------------------------------------------------------- KV buffers
def test_kv_buffers_per_layer_with_reserved_page():
    pool = MHATokenToKVPool(size=32, page_size=4, dtype=torch.float16, head_num=2, head_dim=8, layer_num=3)
    assert pool.num_slots == 36  # 8 usable pages + reserved page 0
    k, v = pool.get_kv_buffer(1)
    assert k.shape == v.shape == (36, 2, 8) and k.dtype == torch.float16
    loc = torch.tensor([4, 9, 35])
    ck, cv = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    pool.set_kv_buffer(1, loc, ck, cv)
    assert torch.equal(pool.get_key_buffer(1)[loc], ck.half())
    assert torch.equal(pool.get_value_buffer(1)[loc], cv.half())
    assert pool.get_key_buffer(0).abs().sum() == 0 and pool.get_value_buffer(2).abs().sum() == 0  # other layers untouched
    untouched = torch.ones(36, dtype=torch.bool)
    untouched[loc] = False
    assert pool.get_key_buffer(1)[untouched].abs().sum() == 0
    with pytest.raises(ValueError, match="KV heads per rank"):
        pool.set_kv_buffer(0, loc, torch.randn(3, 4, 8), torch.randn(3, 4, 8))


def test_byte_accounting():
    assert kv_bytes_per_token(num_layers=2, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16) == 2 * 2 * 4 * 64 * 2
    pool = MHATokenToKVPool(size=64, page_size=16, dtype=torch.float32, head_num=2, head_dim=8, layer_num=4)
    assert pool.bytes_per_token == 2 * 4 * 2 * 8 * 4
    real = sum(t.numel() * t.element_size() for t in pool.k_buffer + pool.v_buffer)
    assert pool.kv_size_bytes() == real == pool.bytes_per_token * (64 + 16)
    # the budget pays for the reserved page; the result is whole pages that fit
    size = max_tokens_for_budget(real, 4, 2, 8, torch.float32, page_size=16)
    assert size == 64
    assert max_tokens_for_budget(real - 1, 4, 2, 8, torch.float32, page_size=16) == 48
    # halving the KV heads per rank (tensor parallelism) doubles what fits, up to the reserved page
    tp2 = max_tokens_for_budget(real, 4, 1, 8, torch.float32, page_size=16)
    assert tp2 == 2 * (64 + 16) - 16
    assert max_tokens_for_budget(10, 4, 2, 8, torch.float32) == 0
