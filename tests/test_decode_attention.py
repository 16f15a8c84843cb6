"""Decode attention over the paged cache (``PortableOps.paged_decode_attention``: in place on CPU, gathered
elsewhere) against dense attention over each sequence's own K/V, written here in fp64 from the definition,
with every slot the sequences do not own (and every slot past a context) NaN, as in MindIE's ``torch.empty``
cache."""
import math

import pytest
import torch

from atb_llm.models.cogvlm2_llama3_video.device_ops import PortableOps, _block_runs


def dense_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float):
    """softmax(q k^T * scale) v per sequence and head, the query head h reading KV head h // group; fp64."""
    heads = q.shape[1]
    out = []
    for b, (k, v) in enumerate(zip(keys, values)):
        group = heads // k.shape[1]
        rows = []
        for h in range(heads):
            kh, vh = k[:, h // group].double(), v[:, h // group].double()
            weights = torch.softmax(kh @ q[b, h].double() * scale, dim=0)
            rows.append(weights @ vh)
        out.append(torch.stack(rows))
    return torch.stack(out)


def paged_case(lengths, block_size, kv_heads, heads, head_dim, dtype, layout, seed=0):
    """A NaN cache with each sequence's K/V written at the slots its block table names."""
    generator = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lengths]
    max_blocks = max(per_seq) + 1  # one unused trailing column, pointing at junk
    num_blocks = sum(per_seq) + 7
    if layout == "consecutive":
        order = list(range(num_blocks))
    elif layout == "shuffled":
        order = torch.randperm(num_blocks, generator=generator).tolist()
    else:  # reversed: every sequence's blocks run backwards, each a run of one
        order = list(reversed(range(num_blocks)))
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = torch.zeros(len(lengths), max_blocks, dtype=torch.long)
    keys, values = [], []
    cursor = 0
    for b, n in enumerate(lengths):
        blocks = order[cursor:cursor + per_seq[b]]
        cursor += per_seq[b]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        tables[b, len(blocks):] = order[-1]  # a block of nobody's, all NaN
        k = torch.randn(n, kv_heads, head_dim, generator=generator).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=generator).to(dtype)
        for t in range(n):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
        keys.append(k)
        values.append(v)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lengths), keys, values


@pytest.mark.parametrize("layout", ["consecutive", "shuffled", "reversed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["paged_decode_attention", "paged_decode_attention_in_place",
                                  "paged_decode_attention_gathered"])
def test_decode_attention_matches_dense(impl, dtype, layout):
    # Lengths on both sides of block boundaries, one token, and one sequence much longer than the rest.
    lengths = [1, 15, 16, 17, 33, 80]
    heads, kv_heads, head_dim, block_size = 8, 2, 16, 16
    q, k_cache, v_cache, tables, lens, keys, values = paged_case(lengths, block_size, kv_heads, heads, head_dim,
                                                                 dtype, layout)
    scale = head_dim ** -0.5
    out = getattr(PortableOps, impl)(q, k_cache, v_cache, tables, lens, scale)
    expected = dense_attention(q, keys, values, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any()
    # fp32: reordered fp32 sums of <= 80 terms of magnitude ~1; bf16: inputs exact in fp64, scores and the weighted
    # sum rounded to bf16 (relative 2^-8) on outputs of magnitude <= max |v| ~ 4.
    tolerance = 1e-5 if dtype == torch.float32 else 4 * 2 ** -8 * 4
    assert (out.double() - expected).abs().max().item() < tolerance


def test_in_place_reads_only_the_context():
    """Any value in a slot past the context, even inf, leaves the output unchanged: those slots are never read."""
    q, k_cache, v_cache, tables, lens, keys, values = paged_case([20, 9], 8, 1, 2, 8, torch.float32, "shuffled", 3)
    first = PortableOps.paged_decode_attention_in_place(q, k_cache, v_cache, tables, lens, 0.5)
    written = ~k_cache.isnan()
    k_cache[~written], v_cache[~written] = float("inf"), -float("inf")
    second = PortableOps.paged_decode_attention_in_place(q, k_cache, v_cache, tables, lens, 0.5)
    assert torch.equal(first, second)
    assert (first.double() - dense_attention(q, keys, values, 0.5)).abs().max() < 1e-5


def test_block_runs():
    assert _block_runs([4, 5, 6, 2, 3, 9]) == [(4, 3), (2, 2), (9, 1)]
    assert _block_runs([7]) == [(7, 1)]
    assert _block_runs([3, 2, 1]) == [(3, 1), (2, 1), (1, 1)]


def test_prefix_prefill_decode_rows_use_the_same_attention():
    """Decodes sharing a step with a chunk go through the same in-place path (prefix_prefill_attention)."""
    lengths = [12, 30]
    q, k_cache, v_cache, tables, lens, keys, values = paged_case(lengths, 8, 2, 4, 8, torch.float32, "shuffled", 5)
    out = PortableOps.prefix_prefill_attention(q, k_cache, v_cache, tables, [1, 1], lens, 1 / math.sqrt(8))
    assert (out.double() - dense_attention(q, keys, values, 1 / math.sqrt(8))).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["consecutive", "shuffled"])
def test_prefix_prefill_chunks_read_their_context_in_place(layout):
    """Chunks of several rows (a prompt's suffix after a cached prefix) beside a decode row: row j of a chunk of n
    rows attends causally over the first ``length - n + j + 1`` tokens of its sequence, read from the NaN cache in
    place (one run of blocks, or several when shuffled), against fp64 attention from the definition."""
    lengths, q_lens = [40, 9, 23], [5, 1, 23]
    heads, head_dim, scale = 4, 8, 1 / math.sqrt(8)
    _, k_cache, v_cache, tables, lens, keys, values = paged_case(lengths, 8, 2, heads, head_dim, torch.float32,
                                                                 layout, 7)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(8))
    out = PortableOps.prefix_prefill_attention(q, k_cache, v_cache, tables, q_lens, lens, scale)
    assert not out.isnan().any()
    row = 0
    for b, (length, n) in enumerate(zip(lengths, q_lens)):
        for j in range(n):
            visible = length - n + j + 1
            expected = dense_attention(q[row:row + 1], [keys[b][:visible]], [values[b][:visible]], scale)
            assert (out[row].double() - expected[0]).abs().max().item() < 1e-5, (b, j)
            row += 1
