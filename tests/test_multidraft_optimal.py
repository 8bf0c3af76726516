"""Multi-draft verification against its optimum: the exact optimal acceptance rate (min-cut over
token sets) equals the transport LP's value, reduces to sum min(p, q) for one draft, and bounds
the acceptance that mmfm's verify_multi_draft (recursive rejection sampling) measures - which
in turn matches RRS's exact acceptance, enumerated."""
import pytest
import torch

from mmfm import _ext
from mmfm.generate.multidraft import draft_tuples, optimal_acceptance, optimal_acceptance_lp, rrs_acceptance
from mmfm.ops import sampling


def _pq(seed: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a peaked target and a flatter, misaligned draft: the regime where drafts disagree with p
    p = torch.softmax(2.0 * torch.randn(V, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(1.0 * torch.randn(V, generator=g, dtype=torch.float64), 0)
    return p, q


def test_extension_is_loaded():
    """The measured acceptance below must come from the compiled op, not the reference."""
    assert _ext.extension_loaded(), f"mmfm._C did not load: {_ext.load_error()}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_cut_equals_transport_lp_and_single_draft_rate(seed):
    p, q = _pq(seed, 5)
    assert optimal_acceptance(p, q, 1) == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-9)
    for k in (2, 3):
        for rep in (True, False):
            opt = optimal_acceptance(p, q, k, rep)
            assert opt == pytest.approx(optimal_acceptance_lp(p, q, k, rep), abs=1e-6)
            assert rrs_acceptance(p, q, k, rep) <= opt + 1e-9
        # the paper's comparison of draft sampling: without replacement is never worse
        assert optimal_acceptance(p, q, k, False) >= optimal_acceptance(p, q, k, True) - 1e-9
    tuples, probs = draft_tuples(q, 3, False)
    assert len(set(map(tuple, tuples.tolist()))) == len(tuples) == 5 * 4 * 3
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)


def test_rrs_is_strictly_below_the_optimum_somewhere():
    """The gap the paper measures exists: on these cases RRS leaves acceptance on the table."""
    gaps = [optimal_acceptance(*_pq(s, 5), 2, rep) - rrs_acceptance(*_pq(s, 5), 2, rep)
            for s in range(3) for rep in (True, False)]
    assert max(gaps) > 0.02


@pytest.mark.parametrize("replacement", [True, False])
def test_measured_acceptance_matches_rrs_exact_and_stays_below_optimal(replacement):
    N, V = 40000, 5
    for seed in range(3):
        p, q = _pq(seed, V)
        for k in (1, 2, 3):
            g = torch.Generator().manual_seed(100 * seed + k)
            cand = torch.multinomial(q.float().expand(N, V), k, replacement=replacement, generator=g)
            _, idx = sampling.verify_multi_draft(p.float().expand(N, V).contiguous(), q.float().expand(N, V).contiguous(),
                                                 cand, replacement=replacement, seed=seed, offset=k)
            measured = float((idx >= 0).double().mean())
            exact, opt = rrs_acceptance(p, q, k, replacement), optimal_acceptance(p, q, k, replacement)
            sd = max(exact * (1 - exact) / N, 1e-12) ** 0.5
            assert abs(measured - exact) < 4.5 * sd + 2e-4, (seed, k, measured, exact)
            assert measured < opt + 4.5 * sd
            if k == 1:   # one draft: RRS is optimal
                assert exact == pytest.approx(opt, abs=1e-7)


def test_bad_arguments_name_the_problem():
    p, q = _pq(0, 4)
    with pytest.raises(ValueError, match="sum to 1"):
        optimal_acceptance(p * 2, q, 2)
    with pytest.raises(ValueError, match="same size"):
        optimal_acceptance(p, torch.ones(3) / 3, 2)
    with pytest.raises(ValueError, match="exceeds 16"):
        optimal_acceptance(torch.ones(17) / 17, torch.ones(17) / 17, 2)
    with pytest.raises(ValueError, match="k must be"):
        optimal_acceptance(p, q, 0)
