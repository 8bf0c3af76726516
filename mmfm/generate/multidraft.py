"""The optimal acceptance rate of multi-draft speculative sampling, computed exactly for small
vocabularies, beside the exact acceptance of the scheme mmfm implements (recursive rejection
sampling, `mmfm.ops.sampling.verify_multi_draft`).

Setting ("Towards Optimal Multi-draft Speculative Decoding"): k drafts x = (x_1..x_k) are drawn
from a joint draft distribution Q (i.i.d. from q with replacement, or from q without
replacement); a verifier outputs Y, which must be distributed as the target p, and a draft is
accepted when Y is one of the x_i. Any verifier is a coupling of Q and p, so the best acceptance
rate is the optimal transport value

    alpha* = max over couplings pi of (x, y) of  P_pi(y in x).

This is a max flow in the bipartite graph draft tuple -> token (edge when the token is in the
tuple; source capacities Q, sink capacities p); its min cut (the dual the paper uses) is

    alpha* = min over token sets H of  p(H) + 1 - Q(every draft in H)

(cut: the tuples lying inside H stay on the source side, so H must hold all their tokens). For
k = 1 this is sum_v min(p(v), q(v)), the single-draft rate. `optimal_acceptance` enumerates the
2^V sets H (V <= 16), and `optimal_acceptance_lp` solves the primal transport problem with
scipy's linprog, a cross-check used by the tests. `rrs_acceptance` is the exact acceptance of
recursive rejection sampling, enumerated over draft tuples with the same recursion (and the same
early stops) as `verify_multi_draft_reference`.
"""
from __future__ import annotations

import itertools

import torch

MAX_VOCAB = 16


def _check(p, q, k: int, name: str = "optimal_acceptance") -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    q = torch.as_tensor(q, dtype=torch.float64).flatten()
    if p.shape != q.shape or p.numel() < 1:
        raise ValueError(f"{name}: p and q must be 1-D distributions of the same size, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    if p.numel() > MAX_VOCAB:
        raise ValueError(f"{name}: the exact computation enumerates token sets; vocabulary {p.numel()} exceeds "
                         f"{MAX_VOCAB}")
    for n, d in (("p", p), ("q", q)):
        if bool((d < 0).any()) or abs(float(d.sum()) - 1.0) > 1e-6:
            raise ValueError(f"{name}: {n} must be non-negative and sum to 1, got sum {float(d.sum()):.6g}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: k must be an int >= 1, got {k!r}")
    return p, q


def draft_tuples(q, k: int, replacement: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered draft tuple with positive probability and its probability under Q:
    (int64 [M, k], float64 [M]). Without replacement the i-th draft is drawn from q with the
    earlier drafts removed (renormalised), as torch.multinomial(q, k) draws them."""
    q = torch.as_tensor(q, dtype=torch.float64).flatten()
    V = q.numel()
    support = [v for v in range(V) if q[v] > 0]
    tuples, probs = [], []
    if replacement:
        for t in itertools.product(support, repeat=k):
            tuples.append(t)
            probs.append(float(torch.prod(q[list(t)])))
    else:
        if k > len(support):
            raise ValueError(f"draft_tuples: {k} drafts without replacement need at least {k} tokens with q > 0, "
                             f"q has {len(support)}")
        for t in itertools.permutations(support, k):
            pr, left = 1.0, 1.0
            for x in t:
                pr *= float(q[x]) / left
                left -= float(q[x])
            tuples.append(t)
            probs.append(pr)
    return torch.tensor(tuples, dtype=torch.long).view(-1, k), torch.tensor(probs, dtype=torch.float64)


def optimal_acceptance(p, q, k: int, replacement: bool = True) -> float:
    """alpha* = min_H p(H) + 1 - Q(all k drafts in H), over all 2^V token sets H."""
    p, q = _check(p, q, k)
    V = p.numel()
    tuples, probs = draft_tuples(q, k, replacement)
    bits = torch.zeros(len(tuples), dtype=torch.long)   # OR of the drafts' bits (repeats count once)
    for i in range(k):
        bits |= 1 << tuples[:, i]
    H = torch.arange(1 << V, dtype=torch.long)                       # every set as a bitmask
    member = ((H[:, None] >> torch.arange(V)[None, :]) & 1).double()   # [2^V, V]
    pH = member @ p
    inside = ((bits[None, :] & ~H[:, None]) == 0).double()            # [2^V, M]: tuple inside H
    return float((pH + 1.0 - inside @ probs).min().clamp(0.0, 1.0))


def optimal_acceptance_lp(p, q, k: int, replacement: bool = True) -> float:
    """The same value from the primal: maximise sum of pi(x, y) over y in x, subject to the
    coupling's marginals Q and p (scipy.optimize.linprog, HiGHS)."""
    from scipy.optimize import linprog

    p, q = _check(p, q, k, "optimal_acceptance_lp")
    V = p.numel()
    tuples, probs = draft_tuples(q, k, replacement)
    M = len(tuples)
    n = M * V                                     # variable pi[m, y] at m * V + y
    c = torch.zeros(n, dtype=torch.float64)
    for m in range(M):
        for y in set(tuples[m].tolist()):
            c[m * V + y] = -1.0
    A = torch.zeros(M + V, n, dtype=torch.float64)
    for m in range(M):
        A[m, m * V:(m + 1) * V] = 1.0
    for y in range(V):
        A[M + y, y::V] = 1.0
    b = torch.cat([probs, p])
    res = linprog(c.numpy(), A_eq=A.numpy(), b_eq=b.numpy(), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"optimal_acceptance_lp: linprog failed: {res.message}")
    return float(-res.fun)


def rrs_acceptance(p, q, k: int, replacement: bool = True) -> float:
    """Exact acceptance rate of recursive rejection sampling (verify_multi_draft with one draft
    distribution q shared by the k drafts): the mean over draft tuples of the chance that some
    draft is accepted, following verify_multi_draft_reference step by step."""
    p, q = _check(p, q, k, "rrs_acceptance")
    tuples, probs = draft_tuples(q, k, replacement)
    total = 0.0
    for t, w in zip(tuples.tolist(), probs.tolist()):
        r = p / p.sum()
        removed = torch.zeros_like(p, dtype=torch.bool)
        reach, acc = 1.0, 0.0
        for x in t:
            qi = q
            if not replacement:
                rest = 1.0 - float(q[removed].sum())
                if not rest > 0:
                    break
                qi = q.masked_fill(removed, 0.0) / rest
            a = min(1.0, float(r[x]) / float(qi[x])) if qi[x] > 0 else 0.0
            acc += reach * a
            reach *= 1.0 - a
            r = (r - qi).clamp(min=0)
            if not float(r.sum()) > 0:
                break
            r = r / r.sum()
            removed[x] = True
        total += w * acc
    return total
