"""Context drafts (mmfm/generate/context_draft.py): the suffix index finds what a brute-force
search finds, chains merge into draft trees as a trie would, the shadow walks' means follow a
change of regime within a few tokens, and Token Recycling with chains still gives exactly the
plain decode loop's tokens while needing fewer passes on repetitive text."""
import random

import pytest
import torch

from mmfm.generate.context_draft import CAPS, ChainScores, ContextIndex, chain_tree, merge_chain
from mmfm.generate.recycling import HostRows, RecyclingMatrix, ancestor_mask, build_tree, tree_template
from mmfm.generate.speculative import token_recycling_generate
from mmfm.generate.speculative_backoff import MeasuredCost, TreeCost
from test_speculative import _model, _time_mean, one_thread, plain_generate  # noqa: F401 (one_thread: autouse fixture)


def _brute_chain(tokens: list[int], max_ngram: int, length: int) -> list[int]:
    """The longest suffix (up to max_ngram) with an earlier occurrence, its most recent one, and
    the tokens after it, copying on from the copy past the end."""
    E = len(tokens)
    for n in range(min(max_ngram, E), 0, -1):
        suf = tokens[E - n:]
        for s in range(E - n - 1, -1, -1):
            if tokens[s:s + n] == suf:
                ext = list(tokens)
                for j in range(length):
                    ext.append(ext[s + n + j])
                return ext[E:]
    return []


@pytest.mark.parametrize("seed,vocab,max_ngram", [(0, 3, 1), (1, 4, 2), (2, 5, 3), (3, 40, 2)])
def test_index_finds_the_most_recent_longest_suffix_match(seed, vocab, max_ngram):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (300,), generator=g).tolist()
    idx = ContextIndex(toks[:5], vocab, max_ngram)
    for i in range(5, len(toks)):
        assert idx.chain(7) == _brute_chain(toks[:i], max_ngram, 7), i
        idx.append(toks[i])
    # a prompt indexed at once (dict comprehensions) is the index token-by-token appends build
    whole = ContextIndex(toks, vocab, max_ngram)
    assert whole.maps == idx.maps and whole.tokens == idx.tokens and whole.match() == idx.match()


def test_a_chain_copies_past_the_end_of_a_loop():
    idx = ContextIndex([9, 1, 2, 3, 1, 2, 3, 1, 2], 10, 2)
    assert idx.chain(8) == [3, 1, 2, 3, 1, 2, 3, 1]      # the occurrence ends 3 before the end: copy on
    assert ContextIndex([5, 6, 7], 10, 3).chain(4) == []  # the last token never occurred before
    with pytest.raises(ValueError, match="max_ngram"):
        ContextIndex([1], 10, 0)


def test_merge_chain_builds_the_trie_of_tree_and_chain():
    """Random trees and chains: the merged tree's mask is its ancestor mask, its depths and
    children follow its parents, the tree's nodes keep their indices, and its root paths are
    the tree's paths plus the chain's prefixes (shared prefixes reuse the tree's nodes)."""
    m = RecyclingMatrix(16, 4)
    for trial in range(150):
        g = torch.Generator().manual_seed(trial)
        # rows of distinct candidates, as a matrix row (a top-k) always is
        m.table[:] = torch.stack([torch.randperm(5, generator=g)[:4] for _ in range(16)]).to(torch.int32)
        dt = build_tree(m, 3, tree_template(int(torch.randint(1, 20, (1,), generator=g)), 4, 6), rows=HostRows(m))
        chain = torch.randint(0, 5, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        mt = merge_chain(dt, chain)
        n = len(dt.parent)
        assert mt.tokens_list[:n] == dt.tokens_list and mt.parent[:n] == dt.parent
        assert torch.equal(mt.mask, ancestor_mask(mt.parent))
        assert mt.tokens.tolist() == mt.tokens_list
        depth = [0]
        for p in mt.parent[1:]:
            depth.append(depth[p] + 1)
        assert mt.depth.tolist() == depth
        assert mt.children == [[j for j, p in enumerate(mt.parent) if p == i] for i in range(len(mt.parent))]

        def paths(t):
            out = set()
            for i in range(1, len(t.parent)):
                p, j = [], i
                while j > 0:
                    p.append(t.tokens_list[j])
                    j = t.parent[j]
                out.add(tuple(reversed(p)))
            return out
        want = paths(dt) | {tuple(chain[:j]) for j in range(1, len(chain) + 1)}
        assert paths(mt) == want and len(mt.parent) == len(want) + 1     # no duplicated node
    c = chain_tree(7, [1, 2, 3])
    assert c.parent == [-1, 0, 1, 2] and torch.equal(c.mask, ancestor_mask(c.parent)) and c.depth.tolist() == [0, 1, 2, 3]


def test_shadow_walks_score_every_cap_and_follow_a_regime_change_at_once():
    """Random tokens from a wide vocabulary, then a period-5 loop: chains never match in the first
    stretch (every cap's mean ~0, no chain chosen), and in the loop each cap's mean reaches its
    cap. A cap's value enters its mean as soon as it is known: a chain is chosen within a period
    of the loop's start, while a walk only closing after all of its 16 drafts were matched would keep
    the means at 0 until 16 tokens after the loop's drafts started to hold."""
    g = torch.Generator().manual_seed(0)
    V = 5000
    rand = torch.randint(5, V, (200,), generator=g).tolist()
    loop = [1, 2, 3, 4, 0] * 20
    idx = ContextIndex([], V, 2)
    sc = ChainScores(16)
    cost = TreeCost(pass_cost=0.3, node_cost=0.08)
    sc.observe(idx, rand)
    assert max(sc.expected(c) for c in sc.caps) < 0.05
    assert sc.best(cost, 1, 0.0, 1.1) == (0, 1.1)
    first = full = None
    for i, t in enumerate(loop):
        sc.observe(idx, [t])
        cap, speed = sc.best(cost, 1, 0.0, 1.1)
        if cap and first is None:
            first = i
        if cap == 16 and full is None:
            full = i
    # the loop is known after one period: short chains win within a few tokens more, the 16-token
    # chain once a walk has matched 16 drafts
    assert first is not None and first < 5 + 5
    assert full is not None and full < 5 + 16 + 8
    for c in sc.caps:
        assert abs(sc.expected(c) - c) < 1e-3               # every walk in the loop accepted its cap
    assert sc.caps == [c for c in CAPS if c < 16] + [16]
    # the merged pass is judged against the tree's own expectation: a tree that already expects
    # more than the chain gains nothing from it
    assert sc.best(cost, 8, 20.0, 2.0)[0] == 0
    state = sc.state()
    again = ChainScores(16, state=state)
    assert again.state() == state


def test_measured_cost_fits_the_slope_from_passes_of_several_sizes():
    """Passes of 3 and 17 nodes timed on the line 0.1 + 0.12 (n - 1) plain steps (the prior says
    0.4 + 0.08 (n - 1)): both parameters are found; passes of one size move only the height."""
    meter = MeasuredCost(TreeCost(pass_cost=0.4, node_cost=0.08))
    for _ in range(8):
        meter.plain(1e-3)
    for i in range(40):
        n = 3 if i % 2 else 17
        meter.tree(n, 1e-3 * (1 + 0.1 + 0.12 * (n - 1)))
    assert abs(meter.node_cost - 0.12) < 0.005 and abs(meter.pass_cost - 0.1) < 0.03
    one = MeasuredCost(TreeCost(pass_cost=0.4, node_cost=0.08))
    for _ in range(8):
        one.plain(1e-3)
    for _ in range(40):
        one.tree(9, 1e-3 * (1 + 0.1 + 0.12 * 8))
    assert abs(one.node_cost - 0.08) < 0.01 and abs(one(9) - (1 + 0.1 + 0.96)) < 0.01
    # after a long plain stretch the fit is back at the prior
    for _ in range(300):
        one.plain(8e-3, 8)
    assert abs(one.pass_cost - 0.4) < 0.01 and abs(one.node_cost - 0.08) < 0.01


def test_measured_cost_refitted_once_per_batch_ends_where_it_would_step_by_step():
    """Long idle stretches refit the cost every IDLE_METER plain steps, not every 8: plain(...,
    batch=64) says no change until 64 steps are in, and then the fit (pulled back toward the
    prior by the same compounded amount) and the step time are those of eight refits of 8."""
    prior = TreeCost(pass_cost=0.4, node_cost=0.08)
    every, batched = MeasuredCost(prior), MeasuredCost(prior)
    for meter in (every, batched):
        for _ in range(8):
            meter.plain(1e-3)
        for i in range(20):
            meter.tree(3 if i % 2 else 17, 1e-3 * (2.0 + 0.15 * (16 if i % 2 == 0 else 2)))
    assert every.pass_cost != prior.pass_cost
    said = []
    for _ in range(8):
        assert every.plain(8e-3, 8)
        said.append(batched.plain(8e-3, 8, 64))
    assert said == [False] * 7 + [True]
    for a, b in ((every.pass_cost, batched.pass_cost), (every.node_cost, batched.node_cost),
                 (every.step_s, batched.step_s)):
        assert abs(a - b) < 1e-9 * max(1.0, abs(a))


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=4, top_p=0.9)])
def test_chains_in_every_pass_give_the_plain_loops_tokens(settings):
    """A chain in every pass (adaptive=False, with and without the matrix tree beside it):
    seeded draws are keyed by position, so every token is the plain loop's."""
    V = 24
    chains = accepted = 0
    for s in range(6):
        model = _model(vocab=V, seed=s, std=0.5)
        prompt = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(s)).tolist()
        want = plain_generate(model, prompt, 40, seed=s, **settings)
        for tree_size in (1, 6):
            got, st = token_recycling_generate(model, prompt, max_new_tokens=40, seed=s, tree_size=tree_size,
                                               adaptive=False, context_draft=6, **settings)
            assert got.tolist() == want, (s, tree_size)
            chains += st.chain_passes
            accepted += st.chain_accepted
    assert chains > 0 and accepted > 0      # the chains ran and their drafts were used


def test_context_drafts_cut_greedy_passes_on_a_looping_model():
    """A tiny byte-level model after 200 training steps (the speculative benchmark's --quick model)
    decodes greedily into loops (runs of spaces, "te tenenen"): with the back-off choosing
    chains, the output is the plain loop's and the passes, summed over six prompts, are far fewer
    than without chains (measured: 103 against 156)."""
    from mmfm.bench.speculative import byte_model, stdlib_sources

    model, encode, _ = byte_model(200, seed=0, cache=False)
    passes = {0: 0, 16: 0}
    for src in stdlib_sources(6):
        prompt = encode(src)[:24]
        want = plain_generate(model, prompt, 100, temperature=0.0)
        for cd in passes:
            got, st = token_recycling_generate(model, prompt, max_new_tokens=100, temperature=0.0, tree_size=20,
                                               context_draft=cd, measure_cost=False,
                                               cost=TreeCost(pass_cost=0.3, node_cost=0.08))
            assert got.tolist() == want, cd
            passes[cd] += st.target_passes
            assert (st.chain_passes > 0) == (cd > 0)
    assert passes[16] < 0.8 * passes[0], passes


def test_context_draft_argument_is_checked():
    model = _model(vocab=16)
    with pytest.raises(ValueError, match="context_draft"):
        token_recycling_generate(model, [1, 2], max_new_tokens=4, context_draft=-1)
    with pytest.raises(ValueError, match="max_len"):
        ChainScores(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unwatched_turns_leave_the_chain_means_near_those_of_every_token_watched(seed):
    """As the chooser's (test_speculative): with every other run of 16 unwatched, the open walks
    dropped, the chains' running means average what they average when every token is watched,
    within 4% for caps up to 8; the longest cap, 16, whose walks must start a run's first token
    to finish inside it, reads up to 15% low, the safe side. Following the walks through the
    unwatched runs instead put the longest cap's mean up to ~2x high."""
    V = 32
    rnd = random.Random(seed)
    seq = [rnd.randrange(V) for _ in range(50)]
    while len(seq) < 30000:          # copies of earlier stretches between random tokens
        if rnd.random() < 0.5:
            p = rnd.randrange(len(seq) - 20)
            seq += seq[p:p + rnd.randrange(1, 20)]
        else:
            seq += [rnd.randrange(V) for _ in range(rnd.randrange(1, 5))]

    def means(turns):
        index, scores = ContextIndex(seq[:50], V, 2), ChainScores(16)

        def observe(toks, watch):
            scores.observe(index, toks, watch)
            return [m for m, _ in scores.state().values()]
        got = _time_mean(observe, seq, turns, 50)
        assert index.tokens == seq          # unwatched tokens join the index all the same
        return got
    every, turns = means(lambda j: True), means(lambda j: j % 2 == 0)
    assert ChainScores(16).caps == [2, 4, 8, 16] and min(every) > 0.3
    for a, b in zip(every[:3], turns[:3]):
        assert abs(b / a - 1) < 0.04, (every, turns)
    assert 0.85 < turns[3] / every[3] <= 1.0, (every, turns)
