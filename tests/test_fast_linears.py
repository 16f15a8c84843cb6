"""The device backend's linears (``make_linear``): oneDNN-prepacked weights and w8a16 int8 weights against
``F.linear`` on the same numbers, and the whole model's greedy tokens against the dense fp32 reference."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from atb_llm.models.cogvlm2_llama3_video.ascend_ops import AscendOps
from atb_llm.models.cogvlm2_llama3_video.device_ops import (
    INT8_DEQUANT_ROWS,
    LINEAR_ENV,
    DenseLinear,
    Fp16Linear,
    Int8Linear,
    PackedLinear,
    PortableOps,
    SplitLinear,
    UpcastLinear,
    fbgemm_fp16_available,
    make_linear,
    onednn_pack_dtype,
)
from atb_llm.runner.sampler import SamplingParams
from tests.reference import DenseReference
from tests.test_model_equivalence import check_against_reference, make_runner

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")
needs_fbgemm_fp16 = pytest.mark.skipif(not fbgemm_fp16_available(), reason="FBGEMM's fp16 GEMM is not in this torch")


def accumulation_bound(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Two fp dot products of length K over the same numbers, summed in different orders, differ by at most
    ``2 K eps sum_k |x_k w_k|`` (each is within ``K eps`` of the exact value, Higham's bound for recursive
    summation; blocked sums are tighter). This is the tolerance of a reordered GEMM, per output element."""
    k = x.shape[-1]
    return 2 * k * eps * (x.abs().double() @ weight.abs().double().T) + 1e-30


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("shape", [(96, 64), (384, 256), (200, 72)])
def test_packed_fp32_matches_f_linear(rows, shape):
    generator = torch.Generator().manual_seed(rows * 1000 + shape[0])
    weight = torch.randn(shape, generator=generator)
    x = torch.randn(rows, shape[1], generator=generator)
    linear = PackedLinear(weight, torch.float32)
    out = linear(x)
    exact = (x.double() @ weight.double().T)
    assert out.shape == (rows, shape[0]) and out.dtype == torch.float32
    # Both against the fp64 product, each within its own accumulation bound: a transposed or misordered packing
    # (errors of order |x||w|) fails by orders of magnitude.
    bound = accumulation_bound(x, weight, torch.finfo(torch.float32).eps) / 2
    assert ((out.double() - exact).abs() <= bound).all()
    assert ((F.linear(x, weight).double() - exact).abs() <= bound).all()
    # The dense weight comes back exactly (packing is a layout change, not a rounding).
    assert torch.equal(linear.weight, weight)


@needs_onednn
def test_packed_keeps_leading_dims_and_strided_input():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2))[..., ::2]  # not contiguous
    out = PackedLinear(weight, torch.float32)(x)
    assert out.shape == (3, 4, 48)
    exact = x.double() @ weight.double().T
    assert ((out.double() - exact).abs() <= accumulation_bound(x, weight, torch.finfo(torch.float32).eps)).all()


@needs_onednn
def test_bf16_weights_pack_where_the_cpu_allows():
    """bf16 weights: packed in bf16 where oneDNN supports it, else in fp32 (exact: bf16 -> fp32 is lossless), and
    outputs in bf16 either way. On this CPU neither path may crash."""
    pack_dtype = onednn_pack_dtype(torch.bfloat16)
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert pack_dtype == expected
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    out = PackedLinear(weight, pack_dtype)(x)
    assert out.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T
    # fp32 accumulation (bf16 accumulates in fp32 too), then one rounding to bf16 (relative 2^-8).
    bound = accumulation_bound(x, weight, torch.finfo(torch.float32).eps) + exact.abs() * 2 ** -8
    assert ((out.double() - exact).abs() <= bound).all()


@needs_onednn
def test_packing_frees_the_original_weight():
    weight = torch.randn(256, 128)
    ref = weakref.ref(weight)
    linear = PackedLinear(weight, torch.float32)
    del weight
    gc.collect()
    assert ref() is None, "the packed linear keeps the unpacked weight alive"
    assert not any(t.numel() == 256 * 128 and not t.is_mkldnn for t in linear.parameters())


def test_linear_choice_follows_the_backend(monkeypatch):
    weight = torch.randn(32, 16)
    monkeypatch.setenv(LINEAR_ENV, "plain")
    assert type(PortableOps.make_linear(weight)) is DenseLinear
    if torch.backends.mkldnn.is_available():
        monkeypatch.setenv(LINEAR_ENV, "packed")
        assert type(PortableOps.make_linear(weight)) is PackedLinear
    monkeypatch.setenv(LINEAR_ENV, "auto")
    assert type(PortableOps.make_linear(weight)) in (DenseLinear, PackedLinear)  # measured: either is right
    monkeypatch.setenv(LINEAR_ENV, "fastest")
    with pytest.raises(ValueError, match=LINEAR_ENV):
        PortableOps.make_linear(weight)
    # Off the CPU, F.linear; the Ascend backend (no make_linear) gets F.linear and refuses quantization.
    assert type(PortableOps.make_linear(torch.empty(32, 16, device="meta"))) is DenseLinear
    assert type(make_linear(AscendOps, weight)) is DenseLinear
    with pytest.raises(ValueError, match="w8a16"):
        make_linear(AscendOps, weight, "w8a16")
    with pytest.raises(ValueError, match="w4a16"):
        PortableOps.make_linear(weight, "w4a16")


def test_many_row_linears_compute_bf16_in_fp32_where_the_cpu_lacks_bf16(monkeypatch):
    """The vision tower's linears (many rows, with bias): bf16 weights kept as given (no copy) and multiplied in
    fp32 on a CPU without native bf16; F.linear where the CPU has it, for fp32 weights, and off the CPU."""
    from atb_llm.models.cogvlm2_llama3_video import device_ops

    weight, bias = torch.randn(48, 40).to(torch.bfloat16), torch.randn(48).to(torch.bfloat16)
    monkeypatch.setattr(device_ops, "_native_low_precision_matmul", lambda dtype: dtype == torch.float32)
    linear = PortableOps.make_linear(weight, bias=bias, many_rows=True)
    assert type(linear) is UpcastLinear
    assert linear.weight.dtype == torch.bfloat16 and linear.weight.data_ptr() == weight.data_ptr()
    x = torch.randn(3, 70, 40).to(torch.bfloat16)
    out = linear(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 70, 48)
    # Against float64 over the same bf16 numbers: only the fp32 accumulation and the output's rounding differ.
    exact = x.double() @ weight.double().T + bias.double()
    assert torch.allclose(out.double(), exact, rtol=2 ** -7, atol=accumulation_bound(x, weight, 2 ** -23).max())
    monkeypatch.setattr(device_ops, "_native_low_precision_matmul", lambda dtype: True)
    assert type(PortableOps.make_linear(weight, bias=bias, many_rows=True)) is DenseLinear
    assert type(PortableOps.make_linear(weight.float(), bias=bias.float(), many_rows=True)) is DenseLinear
    assert type(make_linear(AscendOps, weight, bias=bias, many_rows=True)) is DenseLinear
    with pytest.raises(ValueError, match="quantize"):
        PortableOps.make_linear(weight, "w8a16", many_rows=True)
    with pytest.raises(ValueError, match="bias"):
        PortableOps.make_linear(weight, bias=bias)


@needs_onednn
def test_linear_choice_is_measured_at_the_hosts_batch_sizes(monkeypatch):
    """The measurement times both kernels at 1 row and at the host's batch size (decode_batch_hint)."""
    import atb_llm.models.cogvlm2_llama3_video.device_ops as device_ops

    seen = []

    def record(modules, in_features, dtype, rows, rounds=5):
        seen.append(tuple(rows))
        return [[2.0] * len(rows), [1.0] * len(rows)]  # packed faster at every row count

    monkeypatch.setattr(device_ops, "_time_linears", record)
    monkeypatch.delenv(LINEAR_ENV, raising=False)
    shape = (40, 24)  # a shape no other test measures
    with device_ops.decode_batch_hint(8):
        assert device_ops.cpu_linear_kind(*shape, torch.float32) == "packed"
    with device_ops.decode_batch_hint(1):
        device_ops.cpu_linear_kind(*shape, torch.float32)
    device_ops.cpu_linear_kind(*shape, torch.float32)
    with device_ops.decode_batch_hint(8):
        device_ops.cpu_linear_kind(*shape, torch.float32)  # measured once per batch sizes: cached
    with device_ops.decode_batch_hint(-1):  # MindIE's ModelRunner default: unknown, so the default sizes
        device_ops.cpu_linear_kind(*shape, torch.float32)
    assert seen == [(1, 8), (1,), (1, 16)]


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_is_chosen_only_where_the_stored_weight_wins_one_row_and_loses_the_batch(monkeypatch, dtype):
    """The choice from per-row-count timings (plain, packed): "split" needs a weight packed wider than its own
    dtype (bf16 on a CPU without native bf16), plain faster at 1 row and packed faster at the batch size; otherwise
    the kernel faster over both. COGVLM2_LINEAR=split forces it where it applies, "packed" where it does not."""
    import atb_llm.models.cogvlm2_llama3_video.device_ops as device_ops

    timings = {"plain wins 1, packed wins 16": ([1.0, 9.0], [2.0, 3.0]), "packed wins both": ([3.0, 9.0], [2.0, 3.0]),
               "plain wins both": ([1.0, 2.0], [2.0, 3.0])}
    monkeypatch.delenv(LINEAR_ENV, raising=False)
    monkeypatch.setattr(device_ops, "onednn_pack_dtype", lambda d: torch.float32)  # as on a CPU without bf16
    monkeypatch.setattr(device_ops, "fbgemm_fp16_available", lambda: False)  # fp16: its own test
    splittable = dtype != torch.float32
    expected = {"plain wins 1, packed wins 16": "split" if splittable else "packed", "packed wins both": "packed",
                "plain wins both": "plain"}
    for i, (case, (plain, packed)) in enumerate(timings.items()):
        monkeypatch.setattr(device_ops, "_time_linears", lambda modules, *args, p=plain, k=packed, **kw: [p, k])
        assert device_ops.cpu_linear_kind(50 + i, 30, dtype) == expected[case], case
        with device_ops.decode_batch_hint(1):  # one batch size: nothing to split
            assert device_ops.cpu_linear_kind(50 + i, 30, dtype) != "split"
    monkeypatch.setenv(LINEAR_ENV, "split")
    weight = torch.randn(24, 16).to(dtype)
    assert type(PortableOps.make_linear(weight)) is (SplitLinear if splittable else PackedLinear)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp16_is_a_candidate_only_for_low_precision_weights_without_native_matmuls(monkeypatch, dtype):
    """"fp16" is timed beside plain and packed for a bf16 / fp16 weight on a CPU whose oneDNN packs it in fp32 (and
    where FBGEMM is present), chosen when its time over the probed row counts is the least, never for fp32
    weights (their values do not fit fp16) nor where FBGEMM is absent; forced where it does not apply: "packed"."""
    import atb_llm.models.cogvlm2_llama3_video.device_ops as device_ops

    monkeypatch.delenv(LINEAR_ENV, raising=False)
    monkeypatch.setattr(device_ops, "onednn_pack_dtype", lambda d: torch.float32)  # as on a CPU without bf16
    timed = []

    def timings(modules, in_features, dtype_, rows, rounds=5):
        timed.append([m.kind for m in modules])
        return [{"plain": [1.0, 9.0], "packed": [2.0, 3.0], "fp16": [0.9, 2.5]}[m.kind] for m in modules]

    monkeypatch.setattr(device_ops, "_time_linears", timings)
    applies = dtype != torch.float32
    assert device_ops.cpu_linear_kind(61, 30, dtype) == ("fp16" if applies else "packed")
    assert timed[-1] == (["plain", "packed", "fp16"] if applies else ["plain", "packed"])
    monkeypatch.setattr(device_ops, "fbgemm_fp16_available", lambda: False)
    assert device_ops.cpu_linear_kind(62, 30, dtype) == ("split" if applies else "packed")
    monkeypatch.setattr(device_ops, "fbgemm_fp16_available", fbgemm_fp16_available)
    monkeypatch.setenv(LINEAR_ENV, "fp16")
    weight = torch.randn(24, 16).to(dtype)
    expected = Fp16Linear if applies and fbgemm_fp16_available() else PackedLinear
    assert type(PortableOps.make_linear(weight)) is expected


@needs_fbgemm_fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 6, 40])
def test_fp16_linear_is_the_weight_within_fp16s_reach(dtype, rows):
    """The fp16-packed weight comes back exactly where fp16 holds the value (every fp16 weight; bf16 weights from
    2**-17 up) and within 2**-25 below that; the product is x times that weight with fp32 accumulation, rounded
    once to the model's dtype. Leading dims kept, strided input accepted, the original weight not kept."""
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(72, 48, generator=generator) * 0.02)
    weight[0, :8] = torch.tensor([3e-7, -5e-6, 2 ** -17, 1e-9, 0.0, 300.0, -2.0 ** 10, 7.7e-6])  # tiny and large
    weight = weight.to(dtype)
    ref = weakref.ref(weight)
    linear = Fp16Linear(weight)
    unpacked = linear.weight
    assert unpacked.dtype == dtype and unpacked.shape == weight.shape
    exact = weight.abs() >= 2 ** -17
    assert torch.equal(unpacked[exact], weight[exact])
    assert ((unpacked.double() - weight.double()).abs() <= 2 ** -25).all()
    assert (unpacked[~exact] != weight[~exact]).any() == (dtype == torch.bfloat16)  # fp16 weights: all exact
    x = torch.randn(2, rows, 96, generator=generator).to(dtype)[..., ::2]  # strided
    out = linear(x)
    assert out.dtype == dtype and out.shape == (2, rows, 72)
    product = x.double() @ unpacked.double().T
    eps = torch.finfo(torch.float32).eps
    bound = accumulation_bound(x, unpacked, eps) + product.abs() * torch.finfo(dtype).eps / 2
    assert ((out.double() - product).abs() <= bound).all()
    del weight, unpacked
    gc.collect()
    assert ref() is None, "the fp16-packed linear keeps the original weight alive"


@needs_fbgemm_fp16
def test_weights_beyond_fp16_range_are_not_packed_in_fp16(monkeypatch):
    """A bf16 weight with a value fp16 cannot hold (|w| > 65504) is never saturated into fp16: forced or measured,
    make_linear falls back to the exact fp32-packed weight."""
    monkeypatch.setenv(LINEAR_ENV, "fp16")
    monkeypatch.setattr("atb_llm.models.cogvlm2_llama3_video.device_ops.onednn_pack_dtype", lambda d: torch.float32)
    weight = torch.randn(24, 16).bfloat16()
    assert type(PortableOps.make_linear(weight)) is Fp16Linear
    weight[3, 5] = 1e5
    linear = PortableOps.make_linear(weight)
    assert type(linear) is PackedLinear and torch.equal(linear.weight, weight)


@needs_onednn
def test_split_linear_runs_one_row_on_the_stored_weight_and_more_on_the_packed_copy():
    """One row: exactly F.linear over the stored bf16 weight (the same tensor, not a copy). More rows: the
    fp32-packed copy, within fp32 accumulation plus one bf16 rounding of the fp64 product."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(72, 40, generator=generator).bfloat16()
    linear = SplitLinear(weight)
    assert linear.weight.data_ptr() == weight.data_ptr()
    one = torch.randn(1, 1, 40, generator=generator).bfloat16()
    assert torch.equal(linear(one), F.linear(one, weight))
    rows = torch.randn(2, 5, 40, generator=generator).bfloat16()
    out = linear(rows)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 72)
    assert torch.equal(out, PackedLinear(weight, torch.float32)(rows))
    exact = rows.double() @ weight.double().T
    bound = accumulation_bound(rows, weight, torch.finfo(torch.float32).eps) + exact.abs() * 2 ** -8
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [6, INT8_DEQUANT_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_its_dequantized_weight(dtype, rows):
    """w8a16: per output channel, scale = max|w| / 127 and q = round(w / scale), so the dequantized weight is within
    scale / 2 of the original; the kernel computes x (bf16) times that weight with fp32 accumulation (from
    INT8_DEQUANT_ROWS rows, a prefill, the float GEMM over the dequantized weight does: the same bound)."""
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(80, 96, generator=generator) * torch.linspace(0.01, 3, 80)[:, None]).to(dtype)
    linear = Int8Linear(weight)
    assert linear.qweight.dtype == torch.int8 and linear.qweight.abs().max() <= 127
    scales = weight.float().abs().amax(1) / 127
    assert torch.allclose(linear.scales.float(), scales, rtol=2 ** -8)  # bf16 scales, the kernel's dtype
    dequant = linear.qweight.float() * linear.scales.float()[:, None]
    assert torch.equal(linear.weight, dequant.to(dtype))
    assert ((dequant - weight.float()).abs() <= linear.scales.float()[:, None] / 2 * (1 + 1e-6)).all()
    x = torch.randn(rows, 96, generator=generator).to(dtype)
    out = linear(x)
    assert out.dtype == dtype and out.shape == (rows, 80)
    x_bf16 = x.bfloat16().double()
    exact = x_bf16 @ (linear.qweight.double() * linear.scales.double()[:, None]).T
    # fp32 accumulation, then bf16 output rounding inside the kernel (relative 2^-8).
    bound = accumulation_bound(x_bf16, dequant, torch.finfo(torch.float32).eps) + exact.abs() * 2 ** -8 + 1e-6
    assert ((out.double() - exact).abs() <= bound).all()


@needs_onednn
@pytest.mark.parity
def test_packed_model_greedy_tokens_match_dense_reference(chat_model_dir, video_6_frames, monkeypatch):
    """The whole model over prepacked linears (forced, whatever the measurement says), fp32, NaN-poisoned cache:
    the dense reference's 32 greedy tokens and logits within 1e-4."""
    from transformers import AutoTokenizer

    monkeypatch.setenv(LINEAR_ENV, "packed")
    runner = make_runner(chat_model_dir)
    model = runner.model.model
    linears = [model.lm_head.linear] + [m.linear for layer in model.model.layers
                                        for m in (layer.self_attn.query_key_value, layer.self_attn.dense,
                                                  layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert all(type(m) is PackedLinear for m in linears)
    conversation = [{"role": "user", "content": [{"video": video_6_frames}, {"text": "Describe the video."}]}]
    check_against_reference(runner, DenseReference(chat_model_dir), AutoTokenizer.from_pretrained(chat_model_dir),
                            conversation, "Describe the video.", [])


def test_w8a16_logits_error_is_bounded(chat_model_dir):
    """--quantize w8a16 on the small chat model: the LM linears are int8, the vision tower and lm_head are not,
    and the last prompt position's logits stay close to the unquantized fp32 model's. Bound: int8 rounding moves
    each weight by at most 1/254 of its row's max, bf16 activations by 2^-9 relative; over 2 layers the measured
    max error is ~1% of the logits' range (README), so 5% leaves noise room while a wrong scale or a transposed
    weight (errors of the logits' own size) fails."""
    from atb_llm.runner.engine import Request

    prompt = list(range(1000, 1040))
    logits = {}
    for quantize in (None, "w8a16"):
        runner = make_runner(chat_model_dir, quantize=quantize)
        model = runner.model.model
        layer = model.model.layers[0]
        if quantize:
            assert type(layer.mlp.down_proj.linear) is Int8Linear
            assert type(model.lm_head.linear) is not Int8Linear
            assert model.vision.layers[0].mlp.fc1.weight.dtype == torch.float32
        engine = runner.make_engine()
        rows = []
        engine.on_logits = lambda ids, batch, rows=rows: rows.append(batch[0].clone())
        engine.generate([Request(prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=1, temperature=0.0,
                                                                            ignore_eos=True))])
        logits[quantize] = rows[0]
    reference, quantized = logits[None], logits["w8a16"]
    spread = (reference.max() - reference.min()).item()
    error = (quantized - reference).abs().max().item()
    assert 0 < error < 0.05 * spread


@needs_fbgemm_fp16
def test_fp16_linears_cost_no_accuracy_beyond_bf16s_own(chat_model_dir, monkeypatch):
    """The small chat model in bf16 with every decode linear fp16-packed against the same model with exact bf16
    weights (fp32-packed): the last prompt position's logits differ from the fp32 model's by about as much either
    way (bf16 rounding of activations dominates; the fp16 packing moves only weights below 2**-17, by at most
    2**-25), and both errors are small against the logits' spread."""
    from atb_llm.runner.engine import Request

    # As on a CPU without native bf16 (where fp16 packing applies), whatever this one has.
    monkeypatch.setattr("atb_llm.models.cogvlm2_llama3_video.device_ops.onednn_pack_dtype", lambda d: torch.float32)
    prompt = list(range(1000, 1040))
    logits = {}
    for name, dtype, kind in (("fp32", "float32", "plain"), ("packed", "bfloat16", "packed"),
                              ("fp16", "bfloat16", "fp16")):
        monkeypatch.setenv(LINEAR_ENV, kind)
        runner = make_runner(chat_model_dir, dtype=dtype)
        model = runner.model.model
        expected = {"plain": DenseLinear, "packed": PackedLinear, "fp16": Fp16Linear}[kind]
        assert type(model.lm_head.linear) is expected and type(model.model.layers[0].mlp.down_proj.linear) is expected
        engine = runner.make_engine()
        rows = []
        engine.on_logits = lambda ids, batch, rows=rows: rows.append(batch[0].float().clone())
        engine.generate([Request(prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=1, temperature=0.0,
                                                                            ignore_eos=True))])
        logits[name] = rows[0]
    spread = (logits["fp32"].max() - logits["fp32"].min()).item()
    packed_error = (logits["packed"] - logits["fp32"]).abs().max().item()
    fp16_error = (logits["fp16"] - logits["fp32"]).abs().max().item()
    assert 0 < fp16_error < 0.02 * spread
    assert fp16_error <= 1.5 * packed_error
