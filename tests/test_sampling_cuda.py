"""CUDA sampling kernels against the sort-based references (and against the CPU kernel, which
shares their Philox stream). Skipped, with the reason, without a GPU or a CUDA build."""
import math

import pytest
import torch

from mmfm import _ext
from mmfm.ops import sampling as S

if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)", allow_module_level=True)
if not _ext.extension_loaded():
    pytest.skip(f"mmfm._C is not built: {_ext.load_error()}", allow_module_level=True)
if not _ext.with_cuda():
    pytest.skip("mmfm._C was built without its CUDA kernels (needs a CUDA torch and nvcc at build time)",
                allow_module_level=True)

pytestmark = pytest.mark.cuda
DEV = "cuda"
INF = math.inf


def chi2_critical(df, z=4.753):
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_distribution(tokens, probs, what=""):
    tokens, probs = tokens.cpu(), probs.double().cpu()
    n, V = tokens.numel(), probs.numel()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V, what
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[probs == 0].sum() == 0, f"{what}: draws outside the support"
    E = probs * n
    big = E >= 5
    obs, exp = counts[big].tolist(), E[big].tolist()
    if float(E[~big].sum()) > 0:
        obs.append(float(counts[~big].sum()))
        exp.append(float(E[~big].sum()))
    if len(obs) > 1:
        stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
        assert stat < chi2_critical(len(obs) - 1), f"{what}: chi-square {stat:.1f}"


def data(B, V, seed, integer=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (B, V), generator=g).float() if integer else 2 * torch.randn(B, V, generator=g)
    return x.to(dtype)


COMBOS = [{}, {"temperature": 0.5}, {"top_k": 1}, {"top_k": 7}, {"top_p": 0.0}, {"top_p": 0.9}, {"min_p": 0.05},
          {"min_p": 1.0}, {"typical_p": 0.0}, {"typical_p": 0.9}, {"top_k": 20, "top_p": 0.8},
          {"top_p": 0.95, "typical_p": 0.7},
          {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.02, "typical_p": 0.9}]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("V,integer,dtype", [(50, False, torch.float32), (3000, True, torch.float32),
                                             (50000, False, torch.bfloat16)])
def test_cuda_kept_set_equals_reference(combo, V, integer, dtype):
    x = data(4, V, seed=V, integer=integer, dtype=dtype)
    x[1, ::3] = -INF
    a = S.processed_probs(x.to(DEV), **combo).cpu()
    b = S.processed_probs_reference(x.float(), **combo)
    assert torch.equal(a > 0, b > 0), combo
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_cuda_sample_distribution(combo):
    V, N = 40, 20000
    x = data(1, V, seed=7)
    expected = S.processed_probs_reference(x, **combo)[0]
    tok = S.sample(x.to(DEV).expand(N, V).contiguous(), seed=3, **combo)
    assert_distribution(tok, expected, str(combo))


def test_cuda_greedy_penalties_mask_and_probs():
    x = data(16, 1000, seed=1, integer=True)
    assert torch.equal(S.sample(x.to(DEV), temperature=0.0).cpu(), x.argmax(1))
    hist = torch.randint(-1, 1000, (16, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(16, 1000, generator=torch.Generator().manual_seed(3)) > 0.2
    kw = dict(history=hist, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1, allowed_mask=mask,
              allowed_range=(10, 900), top_k=30, top_p=0.9)
    a = S.processed_probs(x.to(DEV), **{k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in kw.items()}).cpu()
    b = S.processed_probs_reference(x, **kw)
    assert torch.equal(a > 0, b > 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    tok, p = S.sample(x.to(DEV), seed=0, return_probs=True, top_k=30)
    ref = S.processed_probs_reference(x, top_k=30)
    torch.testing.assert_close(p.cpu(), ref.gather(1, tok.cpu()[:, None]).squeeze(1), atol=1e-6, rtol=1e-4)


def test_cuda_draws_match_cpu_draws():
    """Same Philox stream and inverse-CDF order: the devices agree except where a prefix sum
    lies within rounding of the uniform."""
    x = data(256, 32000, seed=4)
    for combo in ({}, {"top_k": 50, "top_p": 0.9}, {"typical_p": 0.9}):
        a = S.sample(x, seed=11, **combo)
        b = S.sample(x.to(DEV), seed=11, **combo).cpu()
        assert float((a == b).double().mean()) > 0.98, combo
    c = S.sample(x.to(DEV), seed=11, top_p=0.9)
    assert torch.equal(c, S.sample(x.to(DEV), seed=11, top_p=0.9))


def test_cuda_per_row_offsets_match_cpu_draws():
    """offset as a tensor (per-row streams, a draft tree's nodes keyed by position): the device
    draws what the CPU kernel draws, and what one-row calls with each offset draw."""
    x = data(256, 32000, seed=5)
    offs = torch.arange(256) % 37
    for combo in ({}, {"top_k": 50, "top_p": 0.9}):
        a = S.sample(x, seed=3, offset=offs, **combo)
        b = S.sample(x.to(DEV), seed=3, offset=offs.to(DEV), **combo).cpu()
        assert float((a == b).double().mean()) > 0.98, combo
        one = torch.cat([S.sample(x[i:i + 1].to(DEV), seed=3, offset=int(offs[i]), **combo) for i in range(16)]).cpu()
        assert torch.equal(one, b[:16]), combo


def test_cuda_edges_and_errors():
    assert S.sample(torch.randn(3, 1, device=DEV), seed=0).tolist() == [0, 0, 0]
    assert S.sample(torch.empty(0, 5, device=DEV)).shape == (0,)
    x = torch.full((2, 64), -INF, device=DEV)
    x[0, 5], x[1, 63] = 1.0, -1e30
    for combo in COMBOS:
        assert S.sample(x, seed=0, **combo).tolist() == [5, 63]
    y = torch.randn(3, 20, device=DEV)
    y[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'logits' has NaN or \+inf in row 2"):
        S.sample(y)
    with pytest.raises(ValueError, match="'top_p'.*row 1"):
        S.sample(torch.randn(2, 5, device=DEV), top_p=torch.tensor([0.5, 1.5], device=DEV))


@pytest.mark.parametrize("replacement", [True, False])
def test_cuda_multi_draft_distribution(replacement):
    V, K, N = 7, 3, 30000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(V, generator=g), 0)
    q = torch.softmax(2 * torch.randn(V, generator=g), 0)
    cand = torch.multinomial(q.expand(N, V), K, replacement=replacement, generator=g)
    tok, _ = S.verify_multi_draft(p.expand(N, V).contiguous().to(DEV), q.expand(N, V).contiguous().to(DEV),
                                  cand.to(DEV), replacement=replacement, seed=1)
    assert_distribution(tok, p, f"multi-draft replacement={replacement}")


def test_cuda_chain_distribution():
    V, G, N = 8, 3, 20000
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(1.5 * torch.randn(G + 1, V, generator=g), -1)
    q = torch.softmax(1.5 * torch.randn(G, V, generator=g), -1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(G)], 1)
    acc, nxt = S.verify_chain(p.expand(N, G + 1, V).contiguous().to(DEV), q.expand(N, G, V).contiguous().to(DEV),
                              drafts.to(DEV), seed=2)
    acc, nxt = acc.cpu(), nxt.cpu()
    emitted = torch.cat([drafts, torch.zeros(N, 1, dtype=torch.int64)], 1)
    emitted[torch.arange(N), acc] = nxt
    for j in range(G + 1):
        assert_distribution(emitted[acc >= j, j], p[j], f"chain position {j}")
    a_cpu, n_cpu = S.verify_chain(p.expand(N, G + 1, V).contiguous(), q.expand(N, G, V).contiguous(), drafts, seed=2)
    assert torch.equal(a_cpu, acc)  # the acceptance coins are the same Philox numbers
