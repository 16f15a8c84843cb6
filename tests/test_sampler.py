"""Tests for atb_llm.runner.sampler."""

from __future__ import annotations

import math

import pytest
import torch

from atb_llm.runner.sampler import (
    Sampler,
    SamplingParams,
    SequenceTokens,
    make_generator,
)

SAMPLER = Sampler()


def _sample_many(
    logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0
) -> list[int]:
    """Draw n samples for one distribution, sharing one seeded generator."""
    gen = make_generator(seed)
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    hist = [SequenceTokens() for _ in range(n)]
    return SAMPLER(logits, [params] * n, hist, [gen] * n).tolist()


def _log_probs(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# -- greedy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(do_sample=False),
        SamplingParams(top_k=1, temperature=0.7),
    ],
)
def test_greedy_is_argmax(params: SamplingParams) -> None:
    assert params.is_greedy
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    hist = [SequenceTokens([1, 2, 3]) for _ in range(5)]
    out = SAMPLER(logits, [params] * 5, hist, [None] * 5)
    assert out.dtype == torch.long
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_rows_mixed_with_sampling_rows_are_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(),
        SamplingParams(top_k=1),
    ]
    gens = [None, make_generator(3), None]
    out = SAMPLER(logits, params, [SequenceTokens() for _ in range(3)], gens)
    assert out[0] == logits[0].argmax()
    assert out[2] == logits[2].argmax()


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(2)
    row = torch.randn(50)
    samples = _sample_many(row, SamplingParams(top_k=1, temperature=1.5), 50)
    assert set(samples) == {int(row.argmax())}


def test_logits_not_modified() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 20)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)] * 2
    SAMPLER(logits, params, [SequenceTokens([1], [2, 2]) for _ in range(2)], [None] * 2)
    assert torch.equal(logits, before)


# -- penalties --------------------------------------------------------------------------


def _hand_penalties(
    logits: list[float],
    prompt: list[int],
    output: list[int],
    rep: float,
    freq: float,
    pres: float,
) -> list[float]:
    """Independent plain-Python reference for the penalty step."""
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        c = output.count(t)
        out[t] -= freq * c + pres * (1 if c > 0 else 0)
    return out


@pytest.mark.parametrize(
    ("rep", "freq", "pres"),
    [
        (1.5, 0.0, 0.0),
        (1.0, 0.7, 0.0),
        (1.0, 0.0, 1.2),
        (0.8, -0.5, 0.3),
        (2.0, 1.0, -1.0),
    ],
)
def test_penalties_match_hand_computation(rep: float, freq: float, pres: float) -> None:
    logits = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0, -0.25, 3.0, 1.5]
    prompt = [0, 1, 1, 7]
    output = [2, 3, 3, 3, 6, 0]
    params = SamplingParams(
        temperature=0.0,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
    )
    hist = SequenceTokens(prompt)
    hist.extend(output)
    got = Sampler.apply_penalties(torch.tensor([logits]), [params], [hist])[0]
    expected = _hand_penalties(logits, prompt, output, rep, freq, pres)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # The greedy pick is taken after the penalties.
    out = SAMPLER(torch.tensor([logits]), [params], [hist], [None])
    assert int(out[0]) == max(range(10), key=lambda i: expected[i])


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]])
    hist = SequenceTokens([0], [1])
    plain = SAMPLER(logits, [SamplingParams(temperature=0.0)], [hist], [None])
    penalised = SAMPLER(
        logits,
        [SamplingParams(temperature=0.0, presence_penalty=0.5)],
        [hist],
        [None],
    )
    assert int(plain[0]) == 1
    assert int(penalised[0]) == 2


def test_sequence_tokens_incremental_counts() -> None:
    seq = SequenceTokens([5, 5, 7])
    assert sorted(seq.seen_ids().tolist()) == [5, 7]
    seq.append(9)
    seq.append(5)
    seq.append(9)
    assert sorted(seq.seen_ids().tolist()) == [5, 7, 9]
    ids, counts = seq.output_counts()
    assert dict(zip(ids.tolist(), counts.tolist())) == {9: 2.0, 5: 1.0}
    assert seq.output_ids == [9, 5, 9]
    assert len(seq) == 6
    # Cached tensors are reused while nothing changes.
    assert seq.output_counts()[0] is seq.output_counts()[0]


# -- filtering --------------------------------------------------------------------------


def test_top_k_support() -> None:
    row = torch.tensor([1.0, 3.0, 0.5, 2.9, -1.0, 2.8, 0.0, 1.5])
    samples = _sample_many(row, SamplingParams(top_k=3), 400)
    assert set(samples) == {1, 3, 5}


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [(0.45, {0}), (0.6, {0, 1}), (0.8, {0, 1, 2}), (0.93, {0, 1, 2, 3})],
)
def test_top_p_support(top_p: float, allowed: set[int]) -> None:
    row = _log_probs([0.5, 0.2, 0.15, 0.1, 0.05])
    samples = _sample_many(row, SamplingParams(top_p=top_p), 600)
    assert set(samples) == allowed


def test_top_k_then_top_p() -> None:
    # top-k keeps {0, 1, 2}; renormalised their cumulative mass is ~0.57, 0.86, 1.0,
    # so top_p=0.75 then keeps {0, 1}.
    row = _log_probs([0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    row[2] += 0.01  # make token 2 strictly third so top-k is unambiguous
    samples = _sample_many(row, SamplingParams(top_k=3, top_p=0.75), 600)
    assert set(samples) == {0, 1}


def _typical_reference(probs: list[float], mass: float) -> set[int]:
    """Plain-Python reference of locally typical sampling's kept set."""
    entropy = -sum(p * math.log(p) for p in probs)
    gaps = [abs(-math.log(p) - entropy) for p in probs]
    order = sorted(range(len(probs)), key=lambda i: gaps[i])
    cum, last = 0.0, len(probs) - 1
    for pos, i in enumerate(order):
        cum += probs[i]
        if cum >= mass:
            last = pos
            break
    threshold = gaps[order[last]]
    return {i for i in range(len(probs)) if gaps[i] <= threshold}


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.7, 0.9])
def test_typical_p_support(mass: float) -> None:
    probs = [0.45, 0.25, 0.15, 0.08, 0.05, 0.02]
    allowed = _typical_reference(probs, mass)
    assert 0 < len(allowed) < len(probs)
    samples = _sample_many(_log_probs(probs), SamplingParams(typical_p=mass), 600)
    assert set(samples) == allowed


def test_temperature_sharpens() -> None:
    row = _log_probs([0.6, 0.4])
    cold = _sample_many(row, SamplingParams(temperature=0.2), 1000)
    hot = _sample_many(row, SamplingParams(temperature=1.0), 1000)
    # p(0) is ~0.88 at T=0.2 versus 0.6 at T=1.
    assert cold.count(0) > hot.count(0) + 150


def test_sampling_follows_distribution() -> None:
    row = _log_probs([0.7, 0.2, 0.1])
    samples = _sample_many(row, SamplingParams(), 4000, seed=11)
    freq = [samples.count(i) / len(samples) for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


# -- randomness -------------------------------------------------------------------------


def test_same_seed_same_samples() -> None:
    torch.manual_seed(4)
    row = torch.randn(1000)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = _sample_many(row, params, 64, seed=1234)
    b = _sample_many(row, params, 64, seed=1234)
    c = _sample_many(row, params, 64, seed=4321)
    assert a == b
    assert a != c


def test_none_generator_uses_global_rng() -> None:
    row = torch.randn(1, 500, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams()]
    torch.manual_seed(99)
    a = [int(SAMPLER(row, params, [SequenceTokens()], [None])[0]) for _ in range(20)]
    torch.manual_seed(99)
    b = [int(SAMPLER(row, params, [SequenceTokens()], [None])[0]) for _ in range(20)]
    assert a == b


def test_make_generator_unseeded_is_independent() -> None:
    draws = {
        int(torch.randint(0, 2**62, (1,), generator=make_generator(None)))
        for _ in range(4)
    }
    assert len(draws) == 4
    g1, g2 = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_batch_invariance() -> None:
    vocab = 128256
    steps = 4
    torch.manual_seed(6)
    all_logits = torch.randn(steps, 4, vocab) * 3
    target = SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1
    )
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, typical_p=0.8, frequency_penalty=0.4),
        SamplingParams(top_p=0.5, presence_penalty=-0.5),
    ]

    # Alone.
    gen = make_generator(2024)
    hist = SequenceTokens([10, 20, 30])
    alone = []
    for s in range(steps):
        tok = int(SAMPLER(all_logits[s, 2:3], [target], [hist], [gen])[0])
        hist.append(tok)
        alone.append(tok)

    # In a batch of 4, at row 2, with other params and generators.
    gens = [None, make_generator(1), make_generator(2024), make_generator(3)]
    hists = [
        SequenceTokens([1]),
        SequenceTokens([2, 3]),
        SequenceTokens([10, 20, 30]),
        SequenceTokens(),
    ]
    params = [others[0], others[1], target, others[2]]
    batched = []
    for s in range(steps):
        out = SAMPLER(all_logits[s], params, hists, gens)
        for h, t in zip(hists, out.tolist()):
            h.append(t)
        batched.append(int(out[2]))
    assert alone == batched


def test_bf16_and_fp16_logits() -> None:
    torch.manual_seed(8)
    logits = torch.randn(3, 1000)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        greedy = SAMPLER(
            low,
            [SamplingParams(temperature=0.0)] * 3,
            [SequenceTokens()] * 3,
            [None] * 3,
        )
        assert greedy.dtype == torch.long
        assert torch.equal(greedy, low.float().argmax(-1))
        params = [SamplingParams(top_k=5, repetition_penalty=1.2)] * 3
        gens = [make_generator(i) for i in range(3)]
        sampled = SAMPLER(low, params, [SequenceTokens([0, 1]) for _ in range(3)], gens)
        assert sampled.dtype == torch.long
        assert sampled.shape == (3,)
        assert all(0 <= t < 1000 for t in sampled.tolist())


def test_batch_size_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="batch size"):
        SAMPLER(torch.zeros(2, 5), [SamplingParams()], [SequenceTokens()], [None])


def test_all_masked_row_does_not_crash() -> None:
    logits = torch.full((1, 6), -math.inf)
    out = SAMPLER(
        logits, [SamplingParams(top_p=0.5)], [SequenceTokens()], [make_generator(0)]
    )
    assert 0 <= int(out[0]) < 6


# -- validation -------------------------------------------------------------------------


def test_defaults_validate() -> None:
    SamplingParams().validate()
    SamplingParams(
        temperature=0,
        top_k=-1,
        top_p=1,
        seed=2**63 - 1,
        stop=["\n\n"],
        stop_token_ids=[128009],
        presence_penalty=-2,
        frequency_penalty=2,
    ).validate()
    assert not SamplingParams().is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("temperature", True),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", None),
        ("typical_p", 0.0),
        ("typical_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", float("inf")),
        ("do_sample", 1),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", None),
        ("include_stop_str_in_output", 0),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", 1.0),
        ("seed", False),
        ("stop", [""]),
        ("stop", "###"),
        ("stop", [1]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", 5),
    ],
)
def test_validate_rejects(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_top_p_candidate_shortcut_matches_full_sort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import atb_llm.runner.sampler as sampler_mod

    torch.manual_seed(9)
    rows = [torch.randn(128256) * scale for scale in (0.5, 4.0, 8.0)]
    for row in rows:
        for top_p in (0.3, 0.9, 0.99):
            fast = sampler_mod._top_p(row, top_p)
            monkeypatch.setattr(sampler_mod, "_TOP_P_CANDIDATES", 10**9)
            full = sampler_mod._top_p(row, top_p)
            monkeypatch.undo()
            assert torch.equal(torch.isinf(fast), torch.isinf(full))
            assert not bool(torch.isinf(fast).all())
