"""The Ascend backend over a fake ``torch_npu`` (tests/fake_npu): per-op agreement with PortableOps, and the
whole model on the Ascend path matching the portable path (greedy tokens equal, logits within 1e-4, fp32)."""
import importlib
import os
import sys

import pytest
import torch

from atb_llm.models.cogvlm2_llama3_video.device_ops import DEVICE_OPS_ENV, PortableOps, get_device_ops
from atb_llm.runner.offline_runner import MultimodalInput, MultimodalPARunner
from atb_llm.runner.sampler import SamplingParams
from tests.reference import poison_kv_cache

FAKE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_npu")


@pytest.fixture()
def fake_npu(monkeypatch):
    """Puts the fake torch_npu on sys.path for one test and takes it away afterwards."""
    monkeypatch.syspath_prepend(FAKE_DIR)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    module = importlib.import_module("torch_npu")
    assert module.IS_FAKE
    module.CALLS.clear()
    yield module
    sys.modules.pop("torch_npu", None)


@pytest.fixture()
def ascend(fake_npu):
    from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

    return AscendOps


def test_backend_selection(monkeypatch, fake_npu):
    from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

    monkeypatch.delenv(DEVICE_OPS_ENV, raising=False)
    assert get_device_ops(torch.device("cpu")) is PortableOps
    monkeypatch.setenv(DEVICE_OPS_ENV, "ascend")
    assert get_device_ops(torch.device("cpu")) is AscendOps
    monkeypatch.setenv(DEVICE_OPS_ENV, "portable")
    assert get_device_ops("cpu") is PortableOps
    monkeypatch.setenv(DEVICE_OPS_ENV, "tpu")
    with pytest.raises(ValueError, match=DEVICE_OPS_ENV):
        get_device_ops("cpu")


def test_missing_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    monkeypatch.setenv(DEVICE_OPS_ENV, "ascend")
    with pytest.raises(RuntimeError, match="torch_npu"):
        get_device_ops("cpu")


def test_rms_norm(ascend, fake_npu):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(7, 64, generator=gen), 1 + 0.1 * torch.randn(64, generator=gen)
    torch.testing.assert_close(ascend.rms_norm(x, weight, 1e-5), PortableOps.rms_norm(x, weight, 1e-5))
    assert fake_npu.CALLS["npu_rms_norm"] == 1


def test_rope(ascend, fake_npu):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    angles = torch.randn(5, 8, generator=gen)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    for got, want in zip(ascend.rope(q, k, cos, sin), PortableOps.rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    assert fake_npu.CALLS["npu_rotary_mul"] == 2


def test_write_kv(ascend, fake_npu):
    gen = torch.Generator().manual_seed(2)
    caches = [torch.zeros(4, 8, 2, 16) for _ in range(4)]
    k, v = torch.randn(5, 2, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    slots = torch.tensor([3, 17, 8, 31, 0], dtype=torch.int64)  # int64 from the runner; the op takes int32
    ascend.write_kv(caches[0], caches[1], k, v, slots)
    PortableOps.write_kv(caches[2], caches[3], k, v, slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert fake_npu.CALLS["_npu_reshape_and_cache"] == 1


def test_prefill_attention_ragged_gqa(ascend, fake_npu):
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 9]
    total = sum(lengths)
    q = torch.randn(total, 4, 16, generator=gen)
    k, v = torch.randn(total, 2, 16, generator=gen), torch.randn(total, 2, 16, generator=gen)
    got = ascend.prefill_attention(q, k, v, lengths, 0.25)
    torch.testing.assert_close(got, PortableOps.prefill_attention(q, k, v, lengths, 0.25), atol=1e-6, rtol=1e-5)
    assert fake_npu.CALLS["_npu_flash_attention"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_attention_in_half_precision(ascend, fake_npu, dtype):
    """The kernels run in fp16/bf16 on an NPU: the mask must build (fp16's bias is -inf, not an overflow)."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 6]
    q = torch.randn(9, 4, 16, generator=gen).to(dtype)
    k, v = torch.randn(9, 2, 16, generator=gen).to(dtype), torch.randn(9, 2, 16, generator=gen).to(dtype)
    got = ascend.prefill_attention(q, k, v, lengths, 0.25)
    want = PortableOps.prefill_attention(q.float(), k.float(), v.float(), lengths, 0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_paged_decode_attention(ascend, fake_npu):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(6, 4, 2, 16, generator=gen), torch.randn(6, 4, 2, 16, generator=gen)
    q = torch.randn(3, 4, 16, generator=gen)
    block_tables = torch.tensor([[5, 2, 0], [1, 0, 0], [3, 4, 0]])  # padded with 0, as the runner does
    context_lens = torch.tensor([7, 1, 8])
    # Slots no sequence has written hold garbage (MindIE's cache is torch.empty): neither backend may read them.
    written = torch.zeros(6, 4, dtype=torch.bool)
    for row, length in zip(block_tables.tolist(), context_lens.tolist()):
        for position in range(length):
            written[row[position // 4], position % 4] = True
    k_cache[~written], v_cache[~written] = float("nan"), float("inf")
    got = ascend.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.25)
    want = PortableOps.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, 0.25)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert fake_npu.CALLS["_npu_paged_attention"] == 1


def _paged_prefix_case(dtype=torch.float32):
    """Three sequences in 4-slot blocks: a decode (1 new of 7), a chunk after a cached prefix (5 new of 9) and a
    whole prompt (3 of 3); every slot no sequence has written holds NaN / inf."""
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache = torch.randn(8, 4, 2, 16, generator=gen), torch.randn(8, 4, 2, 16, generator=gen)
    block_tables = torch.tensor([[5, 2, 0], [1, 6, 3], [4, 0, 0]])
    context_lens, q_lens = torch.tensor([7, 9, 3]), [1, 5, 3]
    written = torch.zeros(8, 4, dtype=torch.bool)
    for row, length in zip(block_tables.tolist(), context_lens.tolist()):
        for position in range(length):
            written[row[position // 4], position % 4] = True
    k_cache[~written], v_cache[~written] = float("nan"), float("inf")
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    return [t.to(dtype) for t in (q, k_cache, v_cache)] + [block_tables, q_lens, context_lens]


def test_prefix_prefill_attention(ascend, fake_npu):
    """Chunked prefill / prefix-cache hits: the SplitFuse operator against PortableOps, and PortableOps against
    plain causal attention over each sequence's whole context."""
    q, k_cache, v_cache, block_tables, q_lens, context_lens = _paged_prefix_case()
    got = ascend.prefix_prefill_attention(q, k_cache, v_cache, block_tables, q_lens, context_lens, 0.25)
    want = PortableOps.prefix_prefill_attention(q, k_cache, v_cache, block_tables, q_lens, context_lens, 0.25)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert fake_npu.CALLS["_npu_paged_attention_splitfuse"] == 1
    start = 0
    for b, (n, length) in enumerate(zip(q_lens, context_lens.tolist())):
        blocks = block_tables[b, :-(-length // 4)]
        keys = k_cache[blocks].reshape(-1, 2, 16)[:length]
        values = v_cache[blocks].reshape(-1, 2, 16)[:length]
        for i in range(n):
            visible = length - n + i + 1
            scores = torch.einsum("hd,khd->hk", q[start + i], keys[:visible].repeat_interleave(2, dim=1)) * 0.25
            expected = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:visible].repeat_interleave(2, dim=1))
            torch.testing.assert_close(want[start + i], expected, atol=1e-6, rtol=1e-5)
        start += n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefix_prefill_attention_in_half_precision(ascend, fake_npu, dtype):
    q, k_cache, v_cache, block_tables, q_lens, context_lens = _paged_prefix_case(dtype)
    got = ascend.prefix_prefill_attention(q, k_cache, v_cache, block_tables, q_lens, context_lens, 0.25)
    want = PortableOps.prefix_prefill_attention(q.float(), k_cache.float(), v_cache.float(), block_tables, q_lens,
                                                context_lens, 0.25)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_fake_rejects_int64_indices(fake_npu):
    """The fake keeps the operators' dtype rules, so a backend that forgot a cast fails here too."""
    with pytest.raises(RuntimeError, match="int32"):
        fake_npu._npu_reshape_and_cache(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), torch.zeros(2, 4, 2, 16),
                                        torch.zeros(2, 4, 2, 16), torch.tensor([0]))


def run_model(model_dir: str, items: list[MultimodalInput], steps: int, follow_ups: list[MultimodalInput] = (),
              **options):
    """Greedy tokens and logits of ``items`` run together, then of ``follow_ups`` on the same engine (their
    prompts start like the first ones': prefix-cache hits)."""
    runner = MultimodalPARunner(model_path=model_dir, dtype="float32", device="cpu", max_input_length=2048,
                                max_output_length=steps, max_batch_size=len(items), block_size=16, **options)
    sampling = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    poison_kv_cache(runner.make_cache_manager())
    engine = runner.make_engine()
    logits = {}
    engine.on_logits = lambda ids, rows: [logits.setdefault(i, []).append(r.clone()) for i, r in zip(ids, rows)]
    done = []
    for batch in (items, follow_ups):
        requests = [runner.prepare_request(item, sampling) for item in batch]
        engine.generate(requests)
        done += requests
    assert all(r.error is None for r in done)
    return runner.model.model.ops, [(r.output_ids, torch.stack(logits[r.request_id])) for r in done]


def test_model_on_ascend_path_matches_portable(monkeypatch, fake_npu, chat_model_dir, video_6_frames):
    from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

    items = [MultimodalInput("What is happening in this video?", video_6_frames),
             MultimodalInput("What's deep learning?")]
    steps = 8
    monkeypatch.setenv(DEVICE_OPS_ENV, "portable")
    portable_ops, portable = run_model(chat_model_dir, items, steps)
    monkeypatch.setenv(DEVICE_OPS_ENV, "ascend")
    ascend_ops, ascend = run_model(chat_model_dir, items, steps)
    assert portable_ops is PortableOps and ascend_ops is AscendOps
    for (want_tokens, want_logits), (got_tokens, got_logits) in zip(portable, ascend):
        assert got_tokens == want_tokens
        assert (got_logits - want_logits).abs().max().item() < 1e-4
    for op in ("npu_rms_norm", "npu_rotary_mul", "_npu_reshape_and_cache", "_npu_flash_attention",
               "_npu_paged_attention"):
        assert fake_npu.CALLS[op] > 0, f"{op} was never called"


def test_chunked_prefill_with_prefix_hits_on_ascend_path(monkeypatch, fake_npu, chat_model_dir, video_6_frames):
    """Chunks of 40 tokens sharing steps with a decode, then follow-ups on the cached prefix: the SplitFuse path
    gives the portable path's tokens and logits."""
    from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps

    items = [MultimodalInput("What's deep learning?"), MultimodalInput("What happens?", video_6_frames)]
    follow_ups = [MultimodalInput("What's deep learning? Explain."), MultimodalInput("And then?", video_6_frames)]
    results = {}
    for backend in ("portable", "ascend"):
        monkeypatch.setenv(DEVICE_OPS_ENV, backend)
        results[backend] = run_model(chat_model_dir, items, 4, follow_ups, max_prefill_tokens=40)
    assert results["portable"][0] is PortableOps and results["ascend"][0] is AscendOps
    for (want_tokens, want_logits), (got_tokens, got_logits) in zip(results["portable"][1], results["ascend"][1]):
        assert got_tokens == want_tokens
        assert (got_logits - want_logits).abs().max().item() < 1e-4
    assert fake_npu.CALLS["_npu_paged_attention_splitfuse"] > 0
