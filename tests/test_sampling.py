"""Fused sampling and speculative verification (mmfm.ops.sampling) against the sort-based
references.

Exact: the kept set (support of processed_probs) equals the reference's for every mode and
combination, greedy equals argmax, seeded runs repeat. Statistical: many draws with fixed
seeds are compared with the reference distribution by a chi-square test at significance 1e-6
(cells with expected count < 5 pooled), so a failure means a wrong distribution, not bad luck;
draws outside the support fail outright.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from mmfm.ops import sampling as S

# Like the quant and cache op tests: a missing extension fails (conftest.needs_extension), it is
# never a silent skip, since these tests exist to compare the compiled kernels with the references.
pytestmark = pytest.mark.usefixtures("needs_extension")

INF = math.inf


# ------------------------------------------------------------------------------ helpers
def chi2_critical(df: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(df) at one-sided normal z (4.753 ~ 1e-6), Wilson-Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int]:
    """(statistic, critical value at 1e-6, df) of the draws against probs [V]; cells with an
    expected count < 5 pooled. df = 0 when fewer than two cells remain."""
    probs = probs.double()
    n = tokens.numel()
    counts = torch.bincount(tokens.flatten(), minlength=probs.numel()).double()
    E = probs * n
    big = E >= 5
    obs, exp = counts[big].tolist(), E[big].tolist()
    rest_o, rest_e = float(counts[~big].sum()), float(E[~big].sum())
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    if len(obs) < 2:
        return 0.0, math.inf, 0
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, chi2_critical(len(obs) - 1), len(obs) - 1


def tempered(probs: torch.Tensor, factor: float = 1.3) -> torch.Tensor:
    """probs with its temperature multiplied by `factor`, on the same support."""
    p = probs.double()
    keep = p > 0
    out = torch.zeros_like(p)
    out[keep] = torch.softmax(p[keep].log() / factor, -1)
    return out


def assert_distribution(tokens: torch.Tensor, probs: torch.Tensor, what: str = "", power: bool = True) -> None:
    """Chi-square goodness of fit of the drawn tokens to probs [V]; no draw outside the support.

    power: the same number of draws from `probs` at 1.3x its temperature must fail the same
    test (three seeds), so a sampler off by that much could not pass: the test has the samples
    to see it. Only a target with one token, or one where the caller says a 1.3x temperature
    barely moves it (power=False), is exempt."""
    V = probs.numel()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V, f"{what}: token out of range"
    counts = torch.bincount(tokens.flatten(), minlength=V)
    outside = int(counts[probs == 0].sum())
    assert outside == 0, f"{what}: {outside} draws outside the support"
    stat, crit, df = chi2_statistic(tokens, probs)
    assert stat < crit, f"{what}: chi-square {stat:.1f} >= {crit:.1f} (df {df})"
    if power and int((probs > 0).sum()) > 1:
        wrong = tempered(probs)
        for seed in range(3):
            draws = torch.multinomial(wrong.float(), tokens.numel(), replacement=True,
                                      generator=torch.Generator().manual_seed(seed))
            w_stat, w_crit, _ = chi2_statistic(draws, probs)
            assert w_stat >= w_crit, (f"{what}: {tokens.numel()} draws cannot tell a 1.3x temperature error "
                                      f"(chi-square {w_stat:.1f} < {w_crit:.1f}); draw more")


def assert_same_support(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    diff = (a > 0) != (b > 0)
    if bool(diff.any()):
        row = int(diff.any(1).nonzero()[0, 0])
        raise AssertionError(f"{what}: kept sets differ in row {row}: op keeps {int((a[row] > 0).sum())}, reference "
                             f"{int((b[row] > 0).sum())}, differing tokens {diff[row].nonzero().flatten()[:10].tolist()}")


def logits_data(B, V, seed, scale=2.0, dtype=torch.float32, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # few distinct values: ties everywhere
        x = torch.randint(-6, 7, (B, V), generator=g).float()
    else:
        x = scale * torch.randn(B, V, generator=g)
    return x.to(dtype)


COMBOS = [
    {},
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"top_k": 1},
    {"top_k": 7},
    {"top_p": 0.0},
    {"top_p": 0.3},
    {"top_p": 0.9},
    {"min_p": 0.05},
    {"min_p": 0.5},
    {"min_p": 1.0},
    {"typical_p": 0.0},
    {"typical_p": 0.2},
    {"typical_p": 0.9},
    {"top_k": 20, "top_p": 0.8},
    {"top_k": 20, "min_p": 0.1},
    {"top_p": 0.9, "min_p": 0.05},
    {"top_p": 0.95, "typical_p": 0.7},
    {"min_p": 0.02, "typical_p": 0.5},
    {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.02, "typical_p": 0.9},
]


def combo_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "plain"


# ------------------------------------------------------------------ exact truncation sets
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
@pytest.mark.parametrize("V,integer", [(50, False), (300, True), (3000, False), (3000, True)])
def test_kept_set_equals_reference(combo, V, integer):
    x = logits_data(6, V, seed=V + len(combo), integer=integer)
    x[1, ::3] = -INF  # excluded tokens in one row
    a = S.processed_probs(x, **combo)
    b = S.processed_probs_reference(x, **combo)
    assert_same_support(a, b, combo_id(combo))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(a.sum(1), torch.ones(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combo", [{"top_p": 0.9}, {"typical_p": 0.9}, {"top_p": 0.5, "typical_p": 0.5},
                                   {"min_p": 0.001}, {"top_k": 3000, "top_p": 0.99}], ids=combo_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_set_large_vocab(combo, dtype):
    """V = 50k: the dense path (several bisection passes and compactions); bf16 adds mass ties."""
    x = logits_data(3, 50000, seed=5, scale=3.0, dtype=dtype)
    a = S.processed_probs(x, **combo)
    b = S.processed_probs_reference(x.float(), **combo)
    assert_same_support(a, b, combo_id(combo))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_per_row_parameters():
    B, V = 8, 400
    x = logits_data(B, V, seed=11)
    params = dict(
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.8, 1.0, 1.3]),
        top_k=torch.tensor([0, 5, 3, 0, 40, 400, 1000, 10]),
        top_p=torch.tensor([1.0, 0.9, 0.5, 0.7, 1.0, 0.2, 0.95, 0.0]),
        min_p=torch.tensor([0.0, 0.0, 0.3, 0.1, 0.05, 0.0, 0.01, 0.0]),
        typical_p=torch.tensor([0.5, 1.0, 1.0, 0.9, 0.3, 1.0, 0.8, 1.0]),
    )
    a = S.processed_probs(x, **params)
    b = S.processed_probs_reference(x, **params)
    assert_same_support(a, b)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # each row equals the same row processed alone with scalar parameters
    for r in range(B):
        one = S.processed_probs(x[r:r + 1], **{k: v[r].item() for k, v in params.items()})
        torch.testing.assert_close(one[0], a[r], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    x = logits_data(4, 700, seed=3, scale=4.0, dtype=dtype)
    x[0, :5] = torch.tensor([6.0e-8, -6.0e-8, 1.0e-5, 3.0e4 if dtype == torch.float16 else 1e30, -INF], dtype=dtype)
    for combo in ({}, {"top_k": 10, "top_p": 0.8}, {"typical_p": 0.6}, {"min_p": 0.1}):
        a = S.processed_probs(x, **combo)
        b = S.processed_probs_reference(x.float(), **combo)
        assert_same_support(a, b, f"{dtype} {combo}")
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_half_conversion_all_values():
    """Every finite fp16 value, read by the kernel, orders like torch's conversion: greedy on
    pairs (h, next h) picks the larger, and min_p = 1 keeps exactly the float-equal ties."""
    h = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[torch.isfinite(h)]
    f = h.float()
    row = torch.stack([h, h.flip(0)], 1)  # [n, 2]
    tok = S.sample(row, temperature=0.0)
    ref = torch.stack([f, f.flip(0)], 1).argmax(1)
    assert torch.equal(tok, ref)


# ------------------------------------------------------------------ statistical agreement
@pytest.mark.parametrize("combo", COMBOS[:14] + COMBOS[-2:], ids=combo_id)
def test_sample_distribution(combo):
    V, N = 40, 20000
    x = logits_data(1, V, seed=7, scale=1.5)
    expected = S.processed_probs_reference(x, **combo)[0]
    tokens = S.sample(x.expand(N, V).contiguous(), seed=1234, **combo)
    # typical_p = 0.2 keeps two tokens of almost equal probability, which a 1.3x temperature
    # moves by well under 1%: no affordable sample size sees that, so only fit is checked there
    assert_distribution(tokens, expected, combo_id(combo), power=combo != {"typical_p": 0.2})


def test_sample_distribution_with_ties_and_mask():
    V, N = 30, 20000
    x = logits_data(1, V, seed=1, integer=True)
    mask = torch.ones(V, dtype=torch.bool)
    mask[::4] = False
    for combo in ({"top_k": 4}, {"top_p": 0.5}, {"typical_p": 0.5}, {"min_p": 0.2}):
        expected = S.processed_probs_reference(x, allowed_mask=mask, **combo)[0]
        tokens = S.sample(x.expand(N, V).contiguous(), allowed_mask=mask, seed=99, **combo)
        assert_distribution(tokens, expected, f"ties+mask {combo}")


def test_sample_distribution_large_vocab_dense_path():
    """V = 20000 with top_p only: the draw scans tiles of the dense row."""
    V, N = 20000, 4000
    x = logits_data(1, V, seed=2, scale=4.0)
    expected = S.processed_probs_reference(x, top_p=0.7)[0]
    tokens = S.sample(x.expand(N, V).contiguous(), top_p=0.7, seed=5)
    assert_distribution(tokens, expected, "dense top_p")


def test_returned_probability():
    x = logits_data(64, 500, seed=4)
    combo = {"top_k": 30, "top_p": 0.9, "temperature": 0.8}
    tokens, p = S.sample(x, seed=3, return_probs=True, **combo)
    probs = S.processed_probs(x, **combo)
    torch.testing.assert_close(p, probs.gather(1, tokens[:, None]).squeeze(1), atol=1e-7, rtol=1e-5)
    assert bool((p > 0).all())


# ------------------------------------------------------------------------- exact behaviours
def test_temperature_zero_is_argmax():
    x = logits_data(16, 1000, seed=8, integer=True)  # many tied maxima: the first index wins
    tok, p = S.sample(x, temperature=0.0, top_k=3, top_p=0.1, return_probs=True)
    assert torch.equal(tok, x.argmax(1))
    assert bool((p == 1).all())
    probs = S.processed_probs(x, temperature=0.0)
    assert torch.equal(probs, torch.nn.functional.one_hot(x.argmax(1), 1000).float())
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(S.sample(x.to(dtype), temperature=0.0), x.argmax(1))


def test_greedy_with_penalties_and_range():
    x = torch.tensor([[5.0, 4.0, 3.0, -1.0, 2.0, 0.0]])
    hist = torch.tensor([[0, 0, -1, 3]])
    # rep 2: z0 = 5 / 2 = 2.5 -> then frequency 1 * 2 -> 0.5; z3 = -1 * 2 = -2 -> -3
    tok = S.sample(x, temperature=0.0, history=hist, repetition_penalty=2.0, frequency_penalty=1.0)
    assert tok.tolist() == [1]
    tok = S.sample(x, temperature=0.0, allowed_range=(2, 6))
    assert tok.tolist() == [2]


def test_penalties_match_formula():
    g = torch.Generator().manual_seed(0)
    B, V, L = 3, 50, 12
    x = torch.randn(B, V, generator=g) * 3
    hist = torch.randint(-1, V, (B, L), generator=g)
    hist[0, :4] = 7  # token 7 four times
    rep, pres, freq = torch.tensor([1.3, 0.7, 1.0]), torch.tensor([0.5, -0.25, 0.0]), torch.tensor([0.1, 0.0, 0.3])
    z = x.clone()
    for b in range(B):
        ids = [t for t in hist[b].tolist() if t >= 0]
        for t in set(ids):
            v = z[b, t]
            v = v * rep[b] if v < 0 else v / rep[b]
            v = v - freq[b] * ids.count(t)
            z[b, t] = v - pres[b]
    expected = torch.softmax(z, 1)
    got = S.processed_probs(x, history=hist, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    ref = S.processed_probs_reference(x, history=hist, repetition_penalty=rep, presence_penalty=pres,
                                      frequency_penalty=freq)
    torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-6)
    # with every truncation mode on top
    combo = dict(top_k=20, top_p=0.9, min_p=0.01, typical_p=0.95)
    a = S.processed_probs(x, history=hist, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
                          **combo)
    b = S.processed_probs_reference(x, history=hist, repetition_penalty=rep, presence_penalty=pres,
                                    frequency_penalty=freq, **combo)
    assert_same_support(a, b)


def test_allowed_range_and_mask():
    x = logits_data(4, 100, seed=6)
    rng = torch.tensor([[10, 20], [0, 100], [99, 100], [50, 51]])
    mask = torch.rand(4, 100, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[2, 99] = True
    mask[3, 50] = True
    for combo in ({}, {"top_k": 3}, {"top_p": 0.5, "typical_p": 0.8}):
        a = S.processed_probs(x, allowed_range=rng, allowed_mask=mask, **combo)
        b = S.processed_probs_reference(x, allowed_range=rng, allowed_mask=mask, **combo)
        assert_same_support(a, b)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert float(a[0, :10].sum() + a[0, 20:].sum()) == 0.0
        assert a[2, 99] == 1 and a[3, 50] == 1
    tok = S.sample(x.repeat(50, 1), allowed_range=(10, 20), seed=0)
    assert bool(((tok >= 10) & (tok < 20)).all())


def test_seeded_runs_repeat():
    x = logits_data(32, 3000, seed=9)
    combo = {"top_k": 100, "top_p": 0.95}
    a = S.sample(x, seed=42, **combo)
    assert torch.equal(a, S.sample(x, seed=42, **combo))
    assert not torch.equal(a, S.sample(x, seed=43, **combo))
    assert not torch.equal(a, S.sample(x, seed=42, offset=1, **combo))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(S.sample(x, generator=g1), S.sample(x, generator=g2))
    torch.manual_seed(5)
    c = S.sample(x)
    torch.manual_seed(5)
    assert torch.equal(c, S.sample(x))
    # a row's draw depends on (seed, offset, row index), not on the rest of the batch
    assert torch.equal(S.sample(x, seed=42, **combo)[:8], S.sample(x[:8], seed=42, **combo))


def test_per_row_offsets_draw_what_one_row_calls_draw(monkeypatch):
    """offset as a tensor [B]: row r draws exactly what a one-row call with offset=offset[r]
    draws (the stream of a sequence position, wherever the row sits), on the compiled op and on
    the reference; a wrong shape or dtype is named."""
    x = logits_data(12, 3000, seed=4)
    offs = torch.tensor([5, 0, 7, 7, 2, 9, 1, 3, 3, 8, 4, 6])
    for combo in ({}, {"top_k": 50, "top_p": 0.9}, {"typical_p": 0.8}):
        tok, p = S.sample(x, seed=13, offset=offs, return_probs=True, **combo)
        for r in range(12):
            t1, p1 = S.sample(x[r:r + 1], seed=13, offset=int(offs[r]), return_probs=True, **combo)
            assert int(tok[r]) == int(t1[0]) and float(p[r]) == float(p1[0]), (combo, r)
        # the row index no longer keys the stream: a permuted batch draws the permuted tokens
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
        assert torch.equal(S.sample(x[perm], seed=13, offset=offs[perm], **combo), tok[perm])
    with pytest.raises(ValueError, match=r"'offset'.*\[B=12\]"):
        S.sample(x, seed=0, offset=offs[:5])
    with pytest.raises(TypeError, match="'offset'.*integer"):
        S.sample(x, seed=0, offset=offs.float())
    monkeypatch.setattr(S, "compiled", lambda t: False)     # the pure-torch reference keeps the contract
    ref = S.sample(x, seed=13, offset=offs, top_k=50)
    assert all(int(ref[r]) == int(S.sample(x[r:r + 1], seed=13, offset=int(offs[r]), top_k=50)[0]) for r in range(12))


def test_thread_count_does_not_change_draws():
    code = ("import torch; from mmfm.ops import sampling as S; g = torch.Generator().manual_seed(0); "
            "x = 2 * torch.randn(16, 20000, generator=g); "
            "print(S.sample(x, seed=3, top_p=0.9, typical_p=0.95).tolist())")
    outs = []
    for n in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=n)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------ edges
def test_edge_vocab_of_one_and_empty_batch():
    x = torch.randn(5, 1)
    for combo in ({}, {"top_k": 1}, {"top_p": 0.1}, {"min_p": 1.0}, {"typical_p": 0.0}, {"temperature": 0.0}):
        tok, p = S.sample(x, seed=0, return_probs=True, **combo)
        assert tok.tolist() == [0] * 5 and p.tolist() == [1.0] * 5
    empty = torch.empty(0, 10)
    tok, p = S.sample(empty, return_probs=True, top_k=3)
    assert tok.shape == (0,) and tok.dtype == torch.int64 and p.shape == (0,)
    assert S.processed_probs(empty).shape == (0, 10)


def test_edge_all_but_one_minus_inf():
    x = torch.full((3, 64), -INF)
    x[0, 5], x[1, 63], x[2, 0] = 1.0, -1e30, 7.0
    for combo in COMBOS:
        tok = S.sample(x, seed=1, **combo)
        assert tok.tolist() == [5, 63, 0], combo


def test_edge_neutral_settings_are_off():
    x = logits_data(4, 200, seed=10)
    base = S.processed_probs(x)
    for combo in ({"top_k": 200}, {"top_k": 10**6}, {"top_p": 1.0}, {"min_p": 0.0}, {"typical_p": 1.0},
                  {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "history": torch.randint(0, 200, (4, 9))}):
        assert torch.equal(S.processed_probs(x, **combo), base), combo


def test_edge_ties():
    x = torch.zeros(2, 10)
    x[1, 3:6] = 1.0  # three tied maxima
    assert torch.equal(S.processed_probs(x, top_k=1)[0], torch.full((10,), 0.1))  # all tied with the 1st
    assert torch.equal(S.processed_probs(x, top_k=2)[1] > 0, torch.arange(10).ge(3) & torch.arange(10).lt(6))
    assert torch.equal(S.processed_probs(x, top_p=0.0)[1] > 0, torch.arange(10).ge(3) & torch.arange(10).lt(6))
    assert torch.equal(S.processed_probs(x, min_p=1.0)[1] > 0, torch.arange(10).ge(3) & torch.arange(10).lt(6))
    tok = S.sample(x[1:].expand(3000, 10).contiguous(), top_k=1, seed=0)
    assert set(tok.tolist()) == {3, 4, 5}


# ---------------------------------------------------------------------------------- errors
def test_invalid_rows_raise_naming_the_argument():
    x = torch.randn(3, 20)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"'logits' has NaN or \+inf in row 1"):
        S.sample(x)
    x[1, 4] = INF
    with pytest.raises(ValueError, match=r"'logits' has NaN or \+inf in row 1"):
        S.processed_probs(x)
    x = torch.randn(3, 20)
    x[2] = -INF
    with pytest.raises(ValueError, match="row 2 of 'logits' has no token left"):
        S.sample(x)
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match="no token left"):
        S.sample(x, allowed_mask=torch.zeros(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="overflowed"):
        S.sample(torch.full((1, 4), 1e38), temperature=1e-3)


@pytest.mark.parametrize("name,value", [("temperature", -1.0), ("temperature", INF), ("top_k", -1), ("top_k", 2.5),
                                        ("top_p", 1.5), ("top_p", -0.1), ("min_p", float("nan")), ("typical_p", 2.0),
                                        ("repetition_penalty", 0.0), ("presence_penalty", INF),
                                        ("frequency_penalty", float("nan"))])
def test_bad_parameters_raise_naming_them(name, value):
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=f"'{name}'"):
        S.sample(x, **{name: value})
    with pytest.raises(ValueError, match=f"'{name}'.*row 1"):  # per-row tensors: the kernel checks them
        S.sample(x, **{name: torch.tensor([S.PARAM_DEFAULTS[S.PARAM_NAMES.index(name)], value])})


def test_bad_arguments_raise_naming_them():
    x = torch.randn(2, 10)
    cases = [
        (dict(logits=torch.randn(10)), ValueError, "'logits'"),
        (dict(logits=torch.randint(0, 3, (2, 10))), TypeError, "'logits'"),
        (dict(top_p=torch.ones(3)), ValueError, "'top_p'"),
        (dict(top_k="5"), TypeError, "'top_k'"),
        (dict(allowed_range=(5, 5)), ValueError, "'allowed_range'"),
        (dict(allowed_range=torch.tensor([[0, 5], [3, 11]])), ValueError, "'allowed_range' row 1"),
        (dict(allowed_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "'allowed_mask'"),
        (dict(allowed_mask=torch.ones(2, 10)), TypeError, "'allowed_mask'"),
        (dict(history=torch.tensor([[1, 2], [3, 10]])), ValueError, "'history' has a token id >= V=10 in row 1"),
        (dict(history=torch.ones(2, 3)), TypeError, "'history'"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "'seed' or 'generator'"),
        (dict(seed=1.5), TypeError, "'seed'"),
    ]
    for kw, exc, msg in cases:
        logits = kw.pop("logits", x)
        with pytest.raises(exc, match=msg):
            S.sample(logits, **kw)


def test_raw_op_checks_its_arguments():
    x = torch.randn(2, 10)
    P = S.pack_params(2, 10, "cpu")
    with pytest.raises(ValueError, match="'params'"):
        torch.ops.mmfm.sample(x, P[:, :5], None, None, None, 0, 0)
    with pytest.raises(TypeError, match="'logits'"):
        torch.ops.mmfm.sample(x.double(), P, None, None, None, 0, 0)
    with pytest.raises(ValueError, match="'allowed_range'"):
        torch.ops.mmfm.sample(x, P, torch.tensor([[0, 11], [0, 10]]), None, None, 0, 0)


def test_reference_path_raises_the_same_errors(monkeypatch):
    monkeypatch.setattr(S, "compiled", lambda *t: False)
    x = torch.randn(3, 20)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"'logits' has NaN or \+inf in row 1"):
        S.sample(x)
    with pytest.raises(ValueError, match="'top_p'.*row 1"):
        S.sample(torch.randn(2, 5), top_p=torch.tensor([0.5, 1.5]))
    y = torch.randn(2, 5)
    y[0] = -INF
    with pytest.raises(ValueError, match="row 0 of 'logits' has no token left"):
        S.processed_probs(y)
    # and it samples from the same distribution
    z = logits_data(1, 12, seed=0)
    tok = S.sample(z.expand(5000, 12).contiguous(), top_k=5, seed=0)
    assert_distribution(tok, S.processed_probs_reference(z, top_k=5)[0], "reference path")


def test_wrong_temperature_is_rejected():
    """The chi-square check has the power it claims: the real sampler at temperature 1.3, and the
    verifiers given a target at 1.3x temperature, fail against the temperature-1 distribution
    with the sample sizes the distribution tests use."""
    V, N = 40, 20000
    x = logits_data(1, V, seed=7, scale=1.5)
    tokens = S.sample(x.expand(N, V).contiguous(), seed=1234, temperature=1.3)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distribution(tokens, S.processed_probs_reference(x)[0], power=False)
    p = random_dists(2, 8, seed=1, sharp=1.5)
    q = random_dists(1, 8, seed=2, sharp=1.5)
    d = torch.multinomial(q[0], N, replacement=True, generator=torch.Generator().manual_seed(3))[:, None]
    acc, nxt = S.verify_chain(tempered(p).float().expand(N, 2, 8).contiguous(), q[None].expand(N, 1, 8).contiguous(),
                              d, seed=11)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distribution(torch.where(acc >= 1, d[:, 0], nxt), p[0], power=False)
    p, q = random_dists(1, 7, seed=4, sharp=2.0)[0], random_dists(1, 7, seed=5, sharp=2.0)[0]
    cand = torch.multinomial(q.expand(N, 7), 3, replacement=True, generator=torch.Generator().manual_seed(6))
    tok, _ = S.verify_multi_draft(tempered(p).float().expand(N, 7).contiguous(), q.expand(N, 7).contiguous(), cand,
                                  seed=8)
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distribution(tok, p, power=False)


# -------------------------------------------------------------------- chain verification
def random_dists(n, V, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, V, generator=g), -1)


def test_chain_output_distribution_equals_target():
    V, G, N = 8, 3, 40000  # position 3 is reached by ~11% of rows: ~4400 draws, enough to see a 1.3x temperature
    p = random_dists(G + 1, V, seed=1, sharp=1.5)  # target per position (independent of the prefix here)
    q = random_dists(G, V, seed=2, sharp=1.5)
    g = torch.Generator().manual_seed(3)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(G)], 1)
    acc, nxt = S.verify_chain(p.expand(N, G + 1, V).contiguous(), q.expand(N, G, V).contiguous(), drafts, seed=11)
    assert int(acc.min()) >= 0 and int(acc.max()) <= G
    emitted = torch.cat([drafts, torch.zeros(N, 1, dtype=torch.int64)], 1)
    emitted[torch.arange(N), acc] = nxt
    for j in range(G + 1):
        rows = acc >= j  # rows that emit a token at position j
        assert_distribution(emitted[rows, j], p[j], f"chain position {j}")
    # acceptance rate at position 0 is sum min(p, q)
    rate = float((acc >= 1).double().mean())
    expect = float(torch.minimum(p[0], q[0]).sum())
    assert abs(rate - expect) < 5 * math.sqrt(expect * (1 - expect) / N)


def test_chain_exact_cases():
    V, G = 6, 3
    onehot = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 4]]), V).float()  # deterministic target
    q = torch.full((1, G, V), 1.0 / V)
    acc, nxt = S.verify_chain(onehot, q, torch.tensor([[1, 2, 5]]), seed=0)
    assert acc.tolist() == [2] and nxt.tolist() == [3]
    acc, nxt = S.verify_chain(onehot, q, torch.tensor([[1, 2, 3]]), seed=0)
    assert acc.tolist() == [3] and nxt.tolist() == [4]
    p = random_dists(4, V, seed=0)[None]
    acc, _ = S.verify_chain(p, p[:, :G].clone(), torch.tensor([[0, 1, 2]]), seed=0)  # q == p: always accepted
    assert acc.tolist() == [3]
    acc, nxt = S.verify_chain(p[:, :1].contiguous(), p[:, :0].contiguous(), torch.empty(1, 0, dtype=torch.int64),
                              seed=0)  # G = 0
    assert acc.tolist() == [0] and 0 <= nxt.item() < V
    a1 = S.verify_chain(p.expand(64, 4, V), p[:, :G].flip(-1).expand(64, G, V), torch.zeros(64, G, dtype=torch.int64),
                        seed=5)
    a2 = S.verify_chain(p.expand(64, 4, V), p[:, :G].flip(-1).expand(64, G, V), torch.zeros(64, G, dtype=torch.int64),
                        seed=5)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])


def test_chain_errors():
    p, q = random_dists(4, 5, 0)[None], random_dists(3, 5, 1)[None]
    with pytest.raises(ValueError, match="'draft_tokens' has a token id outside"):
        S.verify_chain(p, q, torch.tensor([[0, 5, 1]]))
    with pytest.raises(ValueError, match="'draft_tokens'"):
        S.verify_chain(p, q, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="same dtype"):
        S.verify_chain(p, q.half(), torch.tensor([[0, 1, 2]]))
    bad = p.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN, inf or negative"):
        S.verify_chain(bad, q, torch.tensor([[0, 1, 2]]))


# --------------------------------------------------------------- multi-draft verification
@pytest.mark.parametrize("replacement", [True, False])
def test_multi_draft_output_distribution_equals_target(replacement):
    V, K, N = 7, 3, 30000
    p = random_dists(1, V, seed=4, sharp=2.0)[0]
    q = random_dists(1, V, seed=5, sharp=2.0)[0]
    g = torch.Generator().manual_seed(6)
    cand = torch.multinomial(q.expand(N, V), K, replacement=replacement, generator=g)
    tok, idx = S.verify_multi_draft(p.expand(N, V).contiguous(), q.expand(N, V).contiguous(), cand,
                                    replacement=replacement, seed=8)
    assert_distribution(tok, p, f"multi-draft replacement={replacement}")
    hit = idx >= 0
    assert torch.equal(tok[hit], cand[hit].gather(1, idx[hit][:, None]).squeeze(1))


def test_multi_draft_without_replacement_accepts_more():
    V, K, N = 10, 4, 20000
    p = random_dists(1, V, seed=12, sharp=2.5)[0]
    q = random_dists(1, V, seed=13, sharp=2.5)[0]
    rates = {}
    for repl in (True, False):
        cand = torch.multinomial(q.expand(N, V), K, replacement=repl, generator=torch.Generator().manual_seed(1))
        _, idx = S.verify_multi_draft(p.expand(N, V).contiguous(), q.expand(N, V).contiguous(), cand,
                                      replacement=repl, seed=2)
        rates[repl] = float((idx >= 0).double().mean())
    assert rates[False] > rates[True] + 5 * math.sqrt(0.25 / N), rates


def test_multi_draft_per_draft_distributions():
    V, K, N = 6, 2, 20000
    p = random_dists(1, V, seed=20)[0]
    qs = random_dists(K, V, seed=21, sharp=2.0)
    g = torch.Generator().manual_seed(22)
    cand = torch.stack([torch.multinomial(qs[i], N, replacement=True, generator=g) for i in range(K)], 1)
    tok, _ = S.verify_multi_draft(p.expand(N, V).contiguous(), qs.expand(N, K, V).contiguous(), cand, seed=1)
    assert_distribution(tok, p, "per-draft q")


def test_multi_draft_exact_and_errors():
    V = 5
    p = torch.nn.functional.one_hot(torch.tensor([3]), V).float()
    q = torch.full((1, V), 0.2)
    for cand, want in (([[0, 3, 3]], (3, 1)), ([[1, 2, 0]], (3, -1)), ([[3, 0, 1]], (3, 0))):
        tok, idx = S.verify_multi_draft(p, q, torch.tensor(cand), seed=0)
        assert (tok.item(), idx.item()) == want
    with pytest.raises(ValueError, match="'candidates' repeats a token in row 0"):
        S.verify_multi_draft(p, q, torch.tensor([[0, 3, 3]]), replacement=False)
    with pytest.raises(ValueError, match="'candidates' has a token id outside"):
        S.verify_multi_draft(p, q, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="'draft_probs'"):
        S.verify_multi_draft(p, q[:, :4], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="replacement=True"):
        S.verify_multi_draft(p, q.expand(1, 2, V), torch.tensor([[0, 1]]), replacement=False)


def test_verification_reference_path(monkeypatch):
    monkeypatch.setattr(S, "compiled", lambda *t: False)
    V, K, N = 5, 2, 4000
    p = random_dists(1, V, seed=30)[0]
    q = random_dists(1, V, seed=31)[0]
    cand = torch.multinomial(q.expand(N, V), K, replacement=False, generator=torch.Generator().manual_seed(0))
    tok, _ = S.verify_multi_draft(p.expand(N, V), q.expand(N, V), cand, replacement=False, seed=0)
    assert_distribution(tok, p, "reference multi-draft")
    d = torch.multinomial(q, N, replacement=True, generator=torch.Generator().manual_seed(1))[:, None]
    acc, nxt = S.verify_chain(torch.stack([p, p])[None].expand(N, 2, V), q[None, None].expand(N, 1, V), d, seed=0)
    first = torch.where(acc >= 1, d[:, 0], nxt)
    assert_distribution(first, p, "reference chain")


def test_repeated_plain_calls_skip_the_checks_but_not_their_errors():
    """A decode loop's call (scalar settings, no constraint, history or generator) skips the argument
    checks once its settings and logits shape have been seen: the tokens are those of the checked
    call and of the reference, every stream is its own, and a bad argument in a later call is still
    named, whatever was cached."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    S._CHECKED.clear()
    first = [S.sample(logits, temperature=0.7, top_p=0.9, seed=11, offset=k) for k in range(40)]
    assert len(S._CHECKED) == 1
    again = [S.sample(logits, temperature=0.7, top_p=0.9, seed=11, offset=k) for k in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(t.tolist()) for t in again}) > 10               # the offset still picks the stream
    checked = [S.sample(logits, temperature=0.7, top_p=0.9, seed=11, offset=k, allowed_range=(0, 50))
               for k in range(40)]                                   # the full path (a constraint given)
    assert all(torch.equal(a, b) for a, b in zip(first, checked))
    greedy = S.sample(logits, temperature=0, seed=1)
    assert torch.equal(S.sample(logits, temperature=0, seed=2), greedy) and torch.equal(greedy, logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        S.sample(logits, temperature=-0.5, top_p=0.9, seed=11)
    with pytest.raises(ValueError, match="top_p"):
        S.sample(logits, temperature=0.7, top_p=1.5, seed=11)
    with pytest.raises(ValueError, match="logits"):
        S.sample(logits[None], temperature=0.7, top_p=0.9, seed=11)
    with pytest.raises(TypeError, match="logits"):
        S.sample(logits.double(), temperature=0.7, top_p=0.9, seed=11)
    with pytest.raises(TypeError, match="offset"):
        S.sample(logits, temperature=0.7, top_p=0.9, seed=11, offset=1.5)
    # constrained calls (Constraints' int64 [B, 2] range and bool [B, V] mask) skip the checks too and
    # draw what the checked call drew; a constraint of another dtype or shape takes the checked path
    rng = torch.tensor([[0, 10], [20, 50], [5, 6]])
    mask = torch.rand(3, 50, generator=g) < 0.5
    mask[:, 5] = True
    S._CHECKED.clear()
    checked = [S.sample(logits, temperature=0.7, seed=5, offset=k, allowed_range=rng, allowed_mask=mask)
               for k in range(30)]
    fast = [S.sample(logits, temperature=0.7, seed=5, offset=k, allowed_range=rng, allowed_mask=mask)
            for k in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(checked, fast))
    drawn = torch.stack(fast)
    assert ((drawn >= rng[:, 0]) & (drawn < rng[:, 1])).all() and mask.gather(1, drawn.T).all()
    assert torch.equal(S.sample(logits, temperature=0.7, seed=5, offset=3, allowed_range=rng.int(),
                                allowed_mask=mask), fast[3])
    with pytest.raises(ValueError, match="allowed_range"):
        S.sample(logits, temperature=0.7, seed=5, allowed_range=rng[:2])
    with pytest.raises(ValueError, match="allowed_mask"):
        S.sample(logits, temperature=0.7, seed=5, allowed_mask=mask[:, :40])
    # seeds outside [0, 2^63) take the checked path, which maps them to the op's int64
    assert torch.equal(S.sample(logits, temperature=0.7, top_p=0.9, seed=-3, offset=2),
                       S.sample(logits, temperature=0.7, top_p=0.9, seed=2**64 - 3, offset=2))
