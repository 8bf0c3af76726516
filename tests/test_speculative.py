"""Speculative decoding is lossless: Token Recycling (static and dynamic trees) and draft-model
decoding give exactly the tokens of the real plain decode loop (mmfm.generate.decode, DenseStep)
at temperature 0, and their sampled sequences follow the exact distribution of plain sampling
(chi-square against the enumerated joint distribution of short sequences, with a power check
that the same test rejects a 1.3x temperature error)."""
import random

import pytest
import torch

from mmfm.generate import speculative
from mmfm.generate.context_draft import ChainScores
from mmfm.generate.decode import SamplingConfig, decode
from mmfm.generate.recycling import HostRows, RecyclingMatrix, build_dynamic_tree, build_tree, tree_template
from mmfm.generate.step import DenseStep
from mmfm.generate.speculative import draft_model_generate, layer_drafter, token_recycling_generate
from mmfm.generate.speculative_backoff import MeasuredCost, TreeChooser, TreeCost, default_cost
from mmfm.models import KVCache, ModelConfig, Transformer
from mmfm.ops import sampling


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine its spin-waits cost
    more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(vocab=64, seed=0, dim=32, layers=2, std=0.02):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=vocab,
                      max_seq_len=256, init_std=std)
    return Transformer(cfg).eval()


@torch.no_grad()
def plain_generate(model, prompt, n, seed=0, **settings):
    """The reference: the decode loop `mmfm generate` runs (DenseStep + the fused sample op)."""
    return decode(model, [torch.tensor(prompt)], None, SamplingConfig(**settings), max_new_tokens=n, seed=seed,
                  stop_on_done=False)[0].tolist()


@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_dense_step_tree_pass_equals_transformer_forward(dtype, tol):
    """The tree pass through DenseStep gives Transformer.forward's logits for the same tree (by
    value, fp32 and bf16 against an fp32 reference) and writes the same keys/values."""
    model = _model(vocab=64, std=0.2)
    prompt = torch.tensor([[3, 9, 27, 17, 5, 44]])
    m = RecyclingMatrix(64, k=3)
    m.table[:] = torch.randint(0, 64, m.table.shape, generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    tree = build_tree(m, 5, tree_template(9, k=3, max_depth=3))
    ref_cache = KVCache.for_model(model, 1, 32)
    model(prompt, cache=ref_cache)
    want = model(tree.tokens[None], attn_mask=tree.mask[None], positions=6 + tree.depth[None], cache=ref_cache)[0]
    low = _model(vocab=64, std=0.2).to(dtype)
    cache = KVCache.for_model(low, 1, 32)
    low(prompt, cache=cache)
    got = DenseStep(low, 32).tree(tree.tokens, cache, 6, tree.depth, tree.mask)
    assert int(cache.lengths[0]) == 6                      # the caller keeps the accepted path
    torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(cache.k[:, :, :, :6 + len(tree.parent)], ref_cache.k[:, :, :, :6 + len(tree.parent)])


def test_dynamic_tree_grows_best_first_under_the_budget():
    m = RecyclingMatrix(10, k=2)
    m.table[1] = torch.tensor([2, 3], dtype=torch.int32)
    m.probs[1] = torch.tensor([0.9, 0.05])
    m.table[2] = torch.tensor([4, 5], dtype=torch.int32)
    m.probs[2] = torch.tensor([0.8, 0.1])
    m.table[4] = torch.tensor([6, -1], dtype=torch.int32)
    m.probs[4] = torch.tensor([0.5, 0.0])
    t = build_dynamic_tree(m, 1, size=4, max_depth=8)
    # values: 2: .9, 4: .72, 6: .36, 5: .09, 3: .05 -> the deep chain wins over the wide root
    assert t.tokens.tolist() == [1, 2, 4, 6] and t.parent == [-1, 0, 1, 2]
    assert t.expected == pytest.approx(0.9 + 0.72 + 0.36)
    assert t.mask.tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    t = build_dynamic_tree(m, 1, size=10, max_depth=8)
    assert sorted(t.tokens.tolist()) == [1, 2, 3, 4, 5, 6]      # -1 and zero-probability entries never drafted
    assert all(0 <= p < i for i, p in enumerate(t.parent) if i)
    t = build_dynamic_tree(m, 1, size=10, max_depth=8, min_value=0.2)
    assert t.tokens.tolist() == [1, 2, 4, 6]
    assert build_dynamic_tree(m, 1, size=10, max_depth=1).tokens.tolist() == [1, 2, 3]


def test_tree_template_is_bfs_ordered_and_tree_prunes_unknown_rows():
    t = tree_template(20, k=4, max_depth=5)
    assert len(t) == 20 and t.parent[0] == -1
    assert all(0 <= p < i for i, p in enumerate(t.parent) if i)           # parents first
    assert all(t.depth[i] == t.depth[p] + 1 for i, p in enumerate(t.parent) if i)
    m = RecyclingMatrix(10, k=4)
    tree = build_tree(m, 3, t)
    assert tree.tokens.tolist() == [3]                                     # cold matrix: root only
    m.table[3] = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    m.table[5] = torch.tensor([9, 1, 2, 0], dtype=torch.int32)
    tree = build_tree(m, 3, t)
    toks = tree.tokens.tolist()
    assert toks[0] == 3 and sorted(toks[c] for c in tree.children[0]) == [5, 6, 7, 8]
    kid5 = next(c for c in tree.children[0] if toks[c] == 5)
    assert [toks[c] for c in tree.children[kid5]] == [9, 1, 2, 0][:len(tree.children[kid5])]
    for i, p in enumerate(tree.parent):                                   # mask = self + ancestors
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = tree.parent[j]
        assert set(tree.mask[i].nonzero().flatten().tolist()) == anc
    assert m.nbytes == 10 * 4 * 4


def test_matrix_update_keeps_topk_of_logits():
    m = RecyclingMatrix(6, k=2)
    logits = torch.tensor([[0., 5, 1, 4, 2, 3], [9., 0, 0, 0, 0, 8]])
    m.update(torch.tensor([2, 4]), logits)
    assert m.table[2].tolist() == [1, 3] and m.table[4].tolist() == [0, 5]
    with pytest.raises(ValueError, match="vocab_size=6"):
        m.update(torch.tensor([0]), torch.zeros(1, 7))


@pytest.mark.parametrize("tree_size,tree,adaptive", [(1, "static", False), (12, "static", False),
                                                     (40, "static", False), (12, "dynamic", False),
                                                     (12, "static", True), (12, "dynamic", True)])
def test_token_recycling_greedy_equals_plain_greedy(tree_size, tree, adaptive):
    """adaptive False: a tree every pass; True: the back-off mixes in plain passes."""
    model = _model(std=0.2)   # a peaked random model: greedy falls into loops, so drafts get accepted
    matrix = RecyclingMatrix(64, k=8)
    total_passes = total_tokens = 0
    for s, prompt in enumerate(([1, 2, 3], [7, 7, 9, 11, 7, 7], list(range(20, 40)))):
        want = plain_generate(model, prompt, 40, temperature=0)
        got, stats = token_recycling_generate(model, prompt, max_new_tokens=40, temperature=0, seed=s,
                                              matrix=matrix, tree_size=tree_size, tree=tree, adaptive=adaptive)
        assert got.tolist() == want
        total_passes += stats.target_passes
        total_tokens += stats.new_tokens
    if tree_size > 1 and not adaptive:   # the trees did get verified and accepted (not only the root path)
        assert total_passes < 0.8 * (total_tokens - 3)


def test_matrix_update_keeps_the_last_row_of_a_repeated_token_and_host_rows_follow():
    """A token twice in one update keeps the row of its last occurrence, in the table and in the
    host copies (HostRows) the loop reads instead of the table. Written through a HostRows, the
    rows (and probabilities) are the loop's at once and the table's after sync(), identical to a
    direct write, with few or many repeats (many: the repeats are dropped before ranking)."""
    m = RecyclingMatrix(6, k=2)
    rows = HostRows(m)
    assert rows(3) == [-1, -1]
    logits = torch.tensor([[0., 5, 1, 4, 2, 3], [9., 0, 0, 0, 0, 8], [0., 0, 7, 6, 0, 0]])
    m.update([3, 1, 3], logits, rows=rows)
    assert rows(3) == [2, 3] and rows(1) == [0, 5]
    assert m.table[3].tolist() == [-1, -1]           # not yet: the loop syncs once per call
    rows.sync()
    assert m.table[3].tolist() == rows(3) == [2, 3]
    assert m.table[1].tolist() == rows(1) == [0, 5]
    # greedy hands over its own topk: same rows, and the probabilities when asked for
    m2 = RecyclingMatrix(6, k=2)
    m2.update([3, 1, 3], logits, 0.5, top=logits.topk(2, dim=-1))
    m.update([3, 1, 3], logits, 0.5)
    assert torch.equal(m2.table, m.table) and torch.allclose(m2.probs, m.probs)
    # through HostRows, with and without the caller's topk, few and many repeats: as a direct write
    g = torch.Generator().manual_seed(1)
    for n in (5, 40):
        toks = torch.randint(0, 6, (n,), generator=g).tolist()
        z = torch.randn(n, 6, generator=g)
        for top in (None, z.topk(2, dim=-1)):
            direct, via = RecyclingMatrix(6, k=2), RecyclingMatrix(6, k=2)
            direct.update(toks, z, 0.7, top=top)
            h = HostRows(via)
            via.update(toks, z, 0.7, top=top, rows=h)
            assert all(h(t) == direct.table[t].tolist() for t in set(toks))
            torch.testing.assert_close(torch.tensor([h.prob(t) for t in sorted(set(toks))]),
                                       direct.probs[sorted(set(toks))])
            h.sync()
            assert torch.equal(via.table, direct.table) and torch.allclose(via.probs, direct.probs)


@torch.no_grad()
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_sampled_plain_steps_leave_each_token_the_row_of_its_last_context(tree):
    """Sampled plain steps batch their logits (16 rows to one topk, through a reused buffer):
    after a call that ran no tree, the row of every token is the top-k of the logits after its
    last occurrence in prompt + output (the rows still pending at the end included), and dynamic
    trees' probabilities are those logits' softmax. Checked against one Transformer.forward over
    the whole sequence."""
    V, k = 96, 4
    model = _model(vocab=V, std=0.02)
    prompt = [5, 9, 5, 17, 60, 2]
    matrix = RecyclingMatrix(V, k=k)
    got, stats = token_recycling_generate(model, prompt, max_new_tokens=41, temperature=1.0, seed=3, matrix=matrix,
                                          tree_size=8, tree=tree)
    assert not stats.tree_nodes and stats.target_passes == 40
    seq = prompt + got.tolist()
    logits = model(torch.tensor([seq]))[0]
    last = {t: i for i, t in enumerate(seq[:-1])}
    assert len(last) > 30
    for t, i in last.items():
        want = logits[i].topk(k).indices.tolist()
        assert matrix.table[t].tolist() == want, f"row {t} (last at {i})"
        if tree == "dynamic":
            p = logits[i].softmax(-1)[want]
            torch.testing.assert_close(matrix.probs[t], p, rtol=1e-4, atol=1e-6)
    unseen = sorted(set(range(V)) - set(last))
    assert (matrix.table[unseen] == -1).all()


@torch.no_grad()
def test_token_recycling_greedy_with_tied_maxima_equals_plain_greedy():
    """Every token's logit equals its pair's (the head's rows come in identical pairs), so every
    maximum is tied: greedy verification must fall back to sample's tie rule (the first index),
    not take topk's first column."""
    model = _model(std=0.2)
    w = model.lm_head.weight
    w[1::2] = w[0::2]
    matrix = RecyclingMatrix(64, k=8)
    for s, prompt in enumerate(([1, 2, 3], [7, 7, 9, 11, 7, 7])):
        want = plain_generate(model, prompt, 30, temperature=0)
        assert all(t % 2 == 0 for t in want)
        got, _ = token_recycling_generate(model, prompt, max_new_tokens=30, temperature=0, seed=s, matrix=matrix,
                                          tree_size=12, adaptive=False)
        assert got.tolist() == want


def test_draft_model_greedy_equals_plain_greedy():
    model = _model(std=0.2)
    other = _model(seed=1, dim=16, layers=1, std=0.2)
    prompt = [5, 6, 7, 8]
    want = plain_generate(model, prompt, 30, temperature=0)
    got, stats = draft_model_generate(model, other, prompt, max_new_tokens=30, num_draft=3, temperature=0)
    assert got.tolist() == want
    # the target as its own drafter: every draft is accepted, num_draft + 1 tokens per pass
    got, stats = draft_model_generate(model, model, prompt, max_new_tokens=30, num_draft=3, temperature=0)
    assert got.tolist() == want
    assert stats.accepted == stats.drafted and stats.acceptance_length > 3.5


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_draft_model_trees_greedy_equal_plain_greedy(tree):
    """Trees of the drafter's top-k tokens, verified in one target pass: the plain greedy tokens,
    with a weak drafter and with the target drafting for itself (then the rank-0 spine always
    holds, so each pass accepts up to the tree's depth); the drafter's cache follows the emitted
    tokens (it would draft from a wrong prefix otherwise, and the target as its own drafter
    would stop matching)."""
    model = _model(std=0.2)
    other = _model(seed=1, dim=16, layers=1, std=0.2)
    prompt = [5, 6, 7, 8]
    want = plain_generate(model, prompt, 40, temperature=0)
    got, stats = draft_model_generate(model, other, prompt, max_new_tokens=40, temperature=0, tree=tree,
                                      tree_size=8, k=3, max_depth=4)
    assert got.tolist() == want and max(stats.tree_nodes) <= 8
    got, stats = draft_model_generate(model, model, prompt, max_new_tokens=40, temperature=0, tree=tree,
                                      tree_size=8, k=3, max_depth=4)
    assert got.tolist() == want
    assert stats.acceptance_length > 2.5


def test_dynamic_draft_tree_follows_the_drafter_probabilities():
    """DySpec's growth: where the drafter is sure, the tree is a deep chain; where it is unsure,
    the budget goes wide near the root; the static template has one shape for both."""
    from mmfm.generate.speculative import draft_tree

    V_ = 16

    def sharp(dt):    # the drafter always puts 0.97 on token (last + 1)
        lg = torch.full((len(dt.parent), V_), -10.0)
        for i, t in enumerate(dt.tokens_list):
            lg[i, (t + 1) % V_] = 0.0
            lg[i] += torch.linspace(0, 1e-3, V_)
        return lg

    def flat(dt):
        return torch.linspace(0, 1e-3, V_).expand(len(dt.parent), V_).clone()

    def probs(lg):
        return torch.softmax(lg, -1)

    deep, _ = draft_tree(sharp, 0, "dynamic", 8, 4, 7, probs)
    assert max(deep.depth) == 7 and deep.tok[:8] == [0, 1, 2, 3, 4, 5, 6, 7]
    wide, _ = draft_tree(flat, 0, "dynamic", 8, 4, 7, probs)
    assert max(wide.depth) <= 2 and sum(d == 1 for d in wide.depth) == 4
    static_sharp, _ = draft_tree(sharp, 0, "static", 8, 4, 7, probs)
    static_flat, _ = draft_tree(flat, 0, "static", 8, 4, 7, probs)
    assert static_sharp.depth == static_flat.depth == list(tree_template(8, 4, 7).depth)


@torch.no_grad()
def test_layer_drafter_is_the_first_layers_with_shared_weights():
    model = _model(layers=3, std=0.2)
    d = layer_drafter(model, 1)
    assert d.embed_tokens.weight is model.embed_tokens.weight and len(d.layers) == 1
    ids = torch.tensor([[3, 9, 27, 17]])
    x = model.embed_tokens(ids)
    cos, sin = model.rotary(torch.arange(4)[None], x.dtype)
    x = model.layers[0](x, None, cos, sin, None)
    torch.testing.assert_close(d(ids), model.lm_head(model.norm(x, None)))
    want = plain_generate(model, [5, 6, 7], 20, temperature=0)
    got, stats = draft_model_generate(model, d, [5, 6, 7], max_new_tokens=20, num_draft=3, temperature=0)
    assert got.tolist() == want and stats.draft_passes > 0
    with pytest.raises(ValueError, match="n_layers"):
        layer_drafter(model, 3)


def test_dynamic_tree_gate_runs_plain_passes_with_the_plain_tokens():
    model = _model(std=0.2)
    want = plain_generate(model, [4, 5, 6], 24, temperature=0)
    got, stats = token_recycling_generate(model, [4, 5, 6], max_new_tokens=24, temperature=0, tree="dynamic",
                                          min_expected=1e9, adaptive=False)
    assert got.tolist() == want
    assert stats.gated_passes == stats.target_passes == 23 and not stats.tree_nodes


def test_eos_and_max_new_tokens_cut_the_output():
    model = _model(std=0.2)
    want = plain_generate(model, [1, 2], 30, temperature=0)
    eos = want[9]
    got, _ = token_recycling_generate(model, [1, 2], max_new_tokens=30, temperature=0, eos_id=eos)
    assert got.tolist() == want[:want.index(eos) + 1]
    got, _ = draft_model_generate(model, model, [1, 2], max_new_tokens=7, num_draft=4, temperature=0)
    assert got.tolist() == want[:7]


def test_bad_arguments_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        token_recycling_generate(model, [1], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt_ids"):
        token_recycling_generate(model, [1, 64], max_new_tokens=2)
    with pytest.raises(ValueError, match="matrix"):
        token_recycling_generate(model, [1], max_new_tokens=2, matrix=RecyclingMatrix(10))
    with pytest.raises(ValueError, match="drafter"):
        draft_model_generate(model, _model(vocab=32), [1], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_draft"):
        draft_model_generate(model, model, [1], max_new_tokens=2, num_draft=0)
    with pytest.raises(ValueError, match="tree: expected one of chain"):
        draft_model_generate(model, model, [1], max_new_tokens=2, tree="bushy")
    with pytest.raises(ValueError, match="tree_size: expected an int >= 2"):
        draft_model_generate(model, model, [1], max_new_tokens=2, tree="dynamic", tree_size=1)


# ------------------------------------------------------------------------- distribution tests
V, N_NEW, PROMPT = 4, 3, [1, 3, 2, 1, 3]


@torch.no_grad()
def exact_joint(model, settings) -> torch.Tensor:
    """P(x1, x2, x3 | prompt) under plain sampling, enumerated over all V**3 sequences."""
    seqs = torch.cartesian_prod(*[torch.arange(V)] * N_NEW)                   # [V^3, 3]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], 1)
    logits = model(ids)[:, len(PROMPT) - 1:-1]                                 # predicts x1..x3
    p = sampling.processed_probs(logits.reshape(-1, V), **settings).view(len(seqs), N_NEW, V).double()
    return p.gather(2, seqs[:, :, None]).squeeze(2).prod(1)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def _counts(tokens_list) -> torch.Tensor:
    c = torch.zeros(V ** N_NEW, dtype=torch.long)
    for t in tokens_list:
        a, b, d = t
        c[(a * V + b) * V + d] += 1
    return c


SETTINGS = [dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)]


# costs that put the break-even near this tiny model's acceptance, so the back-off mixes both kinds of pass
MIXING = TreeCost(pass_cost=0.4, node_cost=0.1)


@pytest.mark.parametrize("settings,adaptive,tree,context", [
    (SETTINGS[0], False, "static", 0), (SETTINGS[1], False, "static", 0),
    (SETTINGS[0], True, "static", None), (SETTINGS[1], True, "static", None),
    (SETTINGS[1], False, "dynamic", 0), (SETTINGS[0], True, "dynamic", None),
    (SETTINGS[0], False, "static", 3), (SETTINGS[1], False, "dynamic", 3)])
def test_token_recycling_sampling_distribution_equals_plain(settings, adaptive, tree, context):
    """adaptive False: a tree every pass; True: the back-off (at costs where it mixes tree and
    plain passes) chooses each pass's kind and budget from the tokens so far, context chains
    included (the default); dynamic: DySpec trees (pruned at node value 0.2); context 3: a
    3-token chain copied from the context merged into every pass's tree. The runs share one
    matrix, so the back-off state carries from call to call as well."""
    model = _model(vocab=V, std=0.5)
    exact = exact_joint(model, settings)
    matrix = RecyclingMatrix(V, k=3)   # shared across calls: hot trees from the first call on
    n, got, passes, plain, sizes, chains = 800, [], 0, 0, set(), 0
    for s in range(n):
        toks, stats = token_recycling_generate(model, PROMPT, max_new_tokens=N_NEW, seed=s, matrix=matrix,
                                               tree_size=10, k=3, adaptive=adaptive, cost=MIXING,
                                               tree=tree, min_value=0.2, measure_cost=False, context_draft=context,
                                               **settings)
        got.append(toks.tolist())
        chains += stats.chain_passes
        passes += stats.target_passes
        plain += stats.plain_passes
        sizes.update(stats.tree_nodes)
    assert passes < n * (N_NEW - 1)         # drafts were accepted, so verification mattered
    assert (plain > 0) == adaptive          # the back-off path ran exactly when enabled
    if adaptive:                            # and it mixed tree passes in
        assert sizes
    if context:
        assert chains > n // 2              # the chains were in the trees

    assert chi2_pvalue(_counts(got), exact) > 1e-3
    # power check: the same statistic rejects samples from a slightly different distribution
    other = exact_joint(model, {**settings, "temperature": settings["temperature"] * 1.3})
    wrong = torch.multinomial(other.float(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(torch.bincount(wrong, minlength=V ** N_NEW), exact) < 1e-3


@pytest.mark.parametrize("tree,adaptive", [("static", False), ("static", True), ("dynamic", True)])
def test_token_recycling_sampled_tokens_are_the_plain_loops(tree, adaptive):
    """Draws are keyed by position (speculative._Rng.at): with the same seed, Token Recycling
    samples token for token what the plain decode loop samples, whatever mix of plain steps and
    trees ran, and the draft-model trees do too. So a seeded run repeats even when the back-off
    decides by measured time."""
    model = _model(vocab=V, std=0.5)
    matrix = RecyclingMatrix(V, k=3)
    drafter = layer_drafter(model, 1)
    passes = tokens = 0
    for s in range(40):
        for settings in SETTINGS:
            want = plain_generate(model, [1, 2, 3, 1, 2], 24, seed=s, **settings)
            got, stats = token_recycling_generate(model, [1, 2, 3, 1, 2], max_new_tokens=24, seed=s, matrix=matrix,
                                                  tree_size=10, k=3, adaptive=adaptive, cost=MIXING, tree=tree,
                                                  **settings)
            assert got.tolist() == want, (s, settings)
            passes += stats.target_passes
            tokens += stats.new_tokens
            got, _ = draft_model_generate(model, drafter, [1, 2, 3, 1, 2], max_new_tokens=24, seed=s, tree=tree,
                                          tree_size=5, k=2, max_depth=2, **settings)
            assert got.tolist() == want, (s, settings, "draft-model tree")
    assert passes < 0.9 * (tokens - 80)     # drafts were accepted: the trees' draws were used


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_draft_model_sampling_distribution_equals_plain(tree):
    """Chain: drafts sampled from a small drafter. Trees: the drafter's top-2 tokens (here the
    target's own first layer: a small random drafter's top tokens were never the target's), so
    drafts are accepted often and rejected often."""
    model = _model(vocab=V, std=0.5)
    drafter = _model(vocab=V, seed=3, dim=16, layers=1, std=0.5) if tree == "chain" else layer_drafter(model, 1)
    settings = SETTINGS[1] if tree != "dynamic" else SETTINGS[0]
    exact = exact_joint(model, settings)
    got, accepted, drafted = [], 0, 0
    for s in range(600):
        toks, stats = draft_model_generate(model, drafter, PROMPT, max_new_tokens=N_NEW, num_draft=2, seed=s,
                                           tree=tree, tree_size=5, k=2, max_depth=2, **settings)
        got.append(toks.tolist())
        accepted += stats.accepted
        drafted += stats.drafted
    assert 0 < accepted < drafted           # drafts were accepted and rejected: verification mattered
    assert chi2_pvalue(_counts(got), exact) > 1e-3


def test_bench_speculative_rejects_a_sample_temperature_of_zero(capsys):
    from mmfm.bench.speculative import main

    assert main(["--quick", "--cases", "decode", "--sample-temperature", "0"]) == 2
    assert "--sample-temperature" in capsys.readouterr().err


def test_bench_speculative_quick_writes_records(tmp_path):
    """The benchmark end to end at toy size (an untrained byte-level stand-in model)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    js = tmp_path / "spec.json"
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "bench", "speculative", "--quick", "--model",
                        str(tmp_path / "none"), "--train-steps", "0", "--threads", "1", "--json", str(js)],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    records = json.loads(js.read_text())
    impls = {r["impl"] for r in records}
    assert {"mmfm", "mmfm_token_recycling", "mmfm_token_recycling_matrix", "mmfm_token_recycling_dynamic",
            "mmfm_draft_model", "mmfm_maskgit", "mmfm_verify_multi_draft"} <= impls
    for r in records:
        assert r["bench"] == "speculative"
        mode = r["case"]["mode"]
        if mode in ("greedy", "sample", "masked"):
            assert r["tokens_per_s"] > 0
        if mode == "greedy":   # every impl computed the plain loop's tokens
            assert r["same_as_plain"] is True
        if mode == "sample" and r["impl"] != "mmfm":   # the trees sample the plain loop's tokens
            assert r.get("same_as_plain") is (None if r["impl"] == "mmfm_draft_model" else True), r["impl"]
        if r["impl"] == "mmfm_token_recycling":
            assert r["matrix_bytes"] == 256 * 8 * 4
        if r["impl"] == "mmfm_token_recycling_matrix":      # the ablation ran without chains
            assert r["chain_passes"] == 0 and r["chain_accepted"] == 0
        if mode == "multidraft":   # measured RRS acceptance matches its exact rate, below the optimum
            assert abs(r["acceptance"] - r["rrs_exact"]) < 5 * r["stderr"] + 1e-3
            assert r["rrs_exact"] <= r["optimal"] + 1e-9
    assert {r["case"]["mode"] for r in records} >= {"greedy", "sample", "tree_compare", "multidraft", "masked"}


# ------------------------------------------------------------------------------- the back-off
def _optimistic(chooser: TreeChooser) -> dict[int, float]:
    """Every budget's running mean at the most its template can accept (its depth)."""
    t = chooser.template
    return {n: float(max(d for d, o in zip(t.depth, t.order) if o < n)) for n in chooser.sizes}


def test_chooser_scores_every_budget_from_the_emitted_tokens():
    """A table that predicts a periodic sequence perfectly drives the chooser to the largest
    budget; then tokens the table never predicts bring it to plain steps within 8 tokens, from
    the most optimistic state; the predicted sequence brings it back."""
    V, k = 32, 4
    table = torch.full((V, k), -1, dtype=torch.int32)
    cycle = [3, 7, 11, 5, 9, 2]
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        table[a, 0] = b                     # rank 0: the next token of the cycle
    ch = TreeChooser(20, k, 8, TreeCost(), last_token=cycle[0])
    assert ch.choose() == 1                 # no evidence yet: plain
    for t in (cycle * 4)[1:]:
        ch.observe(table, t)
    assert ch.choose() == ch.sizes[-1] == 20
    ch.ema = _optimistic(ch)
    steps = 0
    for t in [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 20, 21]:
        ch.observe(table, t)
        steps += 1
        if ch.choose() == 1:
            break
    assert ch.choose() == 1 and steps <= 8
    for t in cycle * 3:
        ch.observe(table, t)
    assert ch.choose() > 1


class _EagerChooser(TreeChooser):
    """The chooser without its shortcuts: every empty walk decays the means at once, and choose()
    looks at every budget every time."""

    def _close(self, orders):
        super()._close(orders)
        self._settle()

    def choose(self):
        self._plain = False
        return super().choose()


def test_chooser_shortcuts_choose_and_score_as_the_eager_chooser():
    """The pending decays and the cached plain answer are bookkeeping only: driven by the same
    tokens and the same changing cost, the chooser picks the same budget at every token as one
    that applies every walk at once and always looks, and ends in the same state. The table
    predicts the stream in stretches (trees win) and not between them (plain steps), so both
    shortcuts and their invalidation are exercised; the cost moves as measured passes would."""
    V, k = 64, 4
    g = torch.Generator().manual_seed(5)
    table = torch.randint(0, V, (V, k), generator=g, dtype=torch.int32)
    stream, t = [], 0
    for i in range(3000):
        follow = (i // 150) % 2 == 0          # 150 predictable tokens, then 150 random ones
        t = int(table[t, int(torch.randint(0, 2, (1,), generator=g))]) if follow else int(torch.randint(0, V, (1,), generator=g))
        stream.append(t)
    fast, eager = (cls(20, k, 8, TreeCost(), last_token=0) for cls in (TreeChooser, _EagerChooser))
    meter = MeasuredCost(TreeCost())
    picks, trees = [], 0
    for i, t in enumerate(stream):
        a, b = fast.choose(), eager.choose()
        assert a == b, f"token {i}: the chooser picked {a}, the eager one {b}"
        trees += a > 1
        if a > 1:
            meter.tree(a, 1.4e-3)
            for ch in (fast, eager):
                ch.set_cost(meter)
        elif meter.plain(1e-3):
            for ch in (fast, eager):
                ch.set_cost(meter)
        for ch in (fast, eager):
            ch.observe(table, t)
        picks.append(a)
    assert 300 < trees < 2700            # both regimes were visited
    for n, (m, q) in eager.state().items():
        assert fast.state()[n] == pytest.approx((m, q), rel=1e-9, abs=1e-300)


def test_a_streak_of_trees_is_judged_by_what_its_trees_accepted():
    """Walks that expect nothing keep the chooser plain; right after a tree that accepted 5
    drafts it runs the same budget again, on that tree's evidence. Trees that then accept
    nothing halve the streak's mean each time, so it ends within 3 trees, and any pass that is
    not a tree ends it at once: the walks alone decide again."""
    ch = TreeChooser(20, 4, 8, TreeCost(), z=0.0)
    assert ch.choose() == 1
    ch.tree_ran(20, 5)
    assert ch.choose() == 20
    picks = []
    while not picks or picks[-1] == 20:
        ch.tree_ran(20, 0)
        picks.append(ch.choose())
    assert picks == [20, 20, 1]      # streak means 2.5, 1.25, 0.625 against a 20-node pass of 1.77 steps
    assert ch.choose() == 1
    ch.tree_ran(12, 5)
    assert ch.choose() == 12
    assert ch.choose() == 1          # the pass after that was a plain one: no streak
    assert ch.choose() == 1


def test_chooser_judges_a_budget_by_a_lower_bound_not_a_lucky_mean():
    """Sampling-like walks (nothing accepted, then two walks of one draft among three) lift the
    2-node budget's mean past break-even: judged by its mean (z = 0) the chooser buys a tree,
    judged by the mean less half a standard error (the default) it stays plain. Walks that accept
    the same 3 drafts every time have no spread: the bound is the mean, and a tree is chosen
    after as few walks as the mean alone needs."""
    def after(walks, z=None):
        ch = TreeChooser(20, 4, 8, TreeCost(), **({} if z is None else {"z": z}))
        for w in walks:
            ch._close(w)
        return ch

    lucky = [[]] * 20 + [[1], [], [1]]      # a walk's orders: the accepted nodes' template order
    assert after(lucky, 0.0).choose() == 2
    ch = after(lucky)
    assert ch.choose() == 1
    assert 0 < ch.expected(2) < ch.ema[2] - 0.08
    steady = [[1, 2, 3]] * 4
    for z in (0.0, None):
        ch = after(steady, z)
        assert ch.choose() > 1
        assert ch.expected(ch.choose()) >= ch.ema[ch.choose()] - 0.8
    # the state travels: a chooser started from it judges alike; an old-style {budget: mean} state
    # is read as walks without spread
    ch = after(lucky)
    again = TreeChooser(20, 4, 8, TreeCost(), state=ch.state())
    assert again.choose() == 1 and again.expected(2) == ch.expected(2)
    assert TreeChooser(20, 4, 8, TreeCost(), state={n: 3.0 for n in ch.sizes}).choose() > 1


def test_measured_cost_stops_a_tree_that_loses_in_time_within_a_few_passes():
    """Walks that accept 0.6 drafts per tree win under the default cost (a 2-node tree costs
    1.23 plain steps); when tree passes are measured at 2.2 plain steps, the chooser turns to plain steps
    within 5 measured passes. One outlier (a 50-step pass) moves the estimate by a bounded
    amount; plain steps relax it back toward the prior, so a tree is tried again later; and tree
    passes measured as cheap bring the estimate down to what they cost."""
    ch = TreeChooser(8, 4, 8, TreeCost(), z=0.0)
    ch.ema = {n: 0.6 for n in ch.sizes}     # every budget: one draft accepted in 60% of the walks
    ch.sq = dict(ch.ema)
    meter = MeasuredCost(TreeCost())
    ch.set_cost(meter)
    assert ch.choose() > 1
    for _ in range(20):
        meter.plain(1e-3)
    passes = 0
    while ch.choose() > 1:
        meter.tree(ch.choose(), 2.2e-3)
        ch.set_cost(meter)
        passes += 1
        assert passes <= 5
    assert passes >= 1 and meter.tree_passes == passes
    assert ch.choose() == 1
    before = meter.pass_cost
    meter.tree(8, 50e-3)                    # one wild pass: clipped to 2 + 2x the estimate
    assert before < meter.pass_cost <= before + 0.2 * (2 + 2 * before) + 1e-9
    steps = 0
    while ch.choose() == 1:                 # plain steps: the estimate relaxes toward the prior's 0.2
        meter.plain(1e-3)
        ch.set_cost(meter)
        steps += 1
        assert steps < 2000
    assert 50 < steps < 1000
    for _ in range(30):
        meter.tree(8, 1.25e-3)              # cheap passes: 0.25 - 7 * 0.03 = 0.04
    # passes of one size fix the line's height there, the slope stays about the prior's
    assert abs(meter(8) - 1.25) < 0.005 and abs(meter.pass_cost - 0.04) < 0.02
    assert MeasuredCost().tree(8, 1.0) is None and MeasuredCost().pass_cost == TreeCost().pass_cost


def test_chooser_shrinks_the_tree_before_giving_up():
    """When only the rank-0 child is ever right, the deep spine pays but the wide levels do not:
    at a node cost where 20 nodes lose to 8, the chooser picks a budget below 20, not plain."""
    V, k = 16, 4
    table = torch.randint(0, V, (V, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    seq = [1]
    for _ in range(60):                     # a walk along rank 0 of whatever the table says
        seq.append(int(table[seq[-1], 0]))
    ch = TreeChooser(40, k, 8, TreeCost(pass_cost=0.2, node_cost=0.1), last_token=seq[0])
    for t in seq[1:]:
        ch.observe(table, t)
    n = ch.choose()
    assert 1 < n < 40


def _time_mean(observe, seq, turns, start):
    """The mean, over the calls, of the running means after each call: observe(tokens, watch) on
    runs of 16 tokens of seq from `start`, watched where turns(i) says so."""
    total, calls = None, 0
    for j, i in enumerate(range(start, len(seq), 16)):
        m = observe(seq[i:i + 16], turns(j))
        total = list(m) if total is None else [a + b for a, b in zip(total, m)]
        calls += 1
    return [a / calls for a in total]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unwatched_turns_leave_the_chooser_means_as_when_every_token_is_watched(seed):
    """Long idle stretches watch every other run (IDLE_WATCH): the walks open when an unwatched
    run begins are dropped. The running means the chooser judges by then average what they
    average when every token is watched (within 3% for every budget, on a sequence whose walks
    accept 0 to several drafts). Following the open walks through the unwatched run instead
    counts only the long ones there, and puts the means 14-24% high."""
    V, k = 32, 4
    table = torch.randint(0, V, (V, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    rows = {t: table[t].tolist() for t in range(V)}
    rnd = random.Random(seed)
    seq = [0]
    for _ in range(30000):     # a recycled candidate of rank 0 or 1 next, with probability 0.7
        row = rows[seq[-1]]
        miss = [t for t in range(V) if t not in row]
        seq.append(row[rnd.randrange(2)] if rnd.random() < 0.7 else rnd.choice(miss))

    def means(turns):
        ch = TreeChooser(20, k, 8, TreeCost(), last_token=seq[0])

        def observe(toks, watch):
            ch.observe_tokens(rows.__getitem__, toks, watch)
            return list(ch.ema.values())
        return _time_mean(observe, seq, turns, 1)
    every, turns = means(lambda j: True), means(lambda j: j % 2 == 0)
    assert min(every) > 0.2
    for a, b in zip(every, turns):
        assert abs(b / a - 1) < 0.03, (every, turns)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_idle_runs_emit_the_plain_loops_tokens_and_stop_at_eos(temperature):
    """While no budget is hopeful, plain steps run back to back and are read back together (runs
    of IDLE_RUN, IDLE_RUN_LONG past IDLE_WATCH idle tokens): the tokens are still the plain
    loop's, eos inside a run still cuts the output after it, max_new_tokens is never passed,
    and the matrix still learns every step's row (the next call's trees would draft them)."""
    V = 512
    model = _model(vocab=V, std=0.001 if temperature else 0.3)
    prompt = [1, 2, 3]
    want = plain_generate(model, prompt, 90, seed=7, temperature=temperature)
    matrix = RecyclingMatrix(V, k=8)
    got, stats = token_recycling_generate(model, prompt, max_new_tokens=90, temperature=temperature, seed=7,
                                          matrix=matrix, tree_size=20)
    assert got.tolist() == want
    assert stats.run_steps >= 40 and stats.target_passes == 89 and not stats.tree_nodes
    seen = [t for t in prompt + want[:-1]]
    assert all(matrix.table[t, 0] >= 0 for t in seen)   # every fed token got its row
    # eos inside a run: the first occurrence late in the output, where runs are long
    at = next(i for i in range(60, 90) if want[i] not in want[:i])
    got, stats = token_recycling_generate(model, prompt, max_new_tokens=90, temperature=temperature, seed=7,
                                          tree_size=20, eos_id=want[at])
    assert got.tolist() == want[:at + 1] and stats.run_steps > 0
    for n in (37, 61):
        got, _ = token_recycling_generate(model, prompt, max_new_tokens=n, temperature=temperature, seed=7,
                                          tree_size=20)
        assert got.tolist() == want[:n]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_long_idle_stretches_watch_every_other_turn(temperature, monkeypatch):
    """Past IDLE_WATCH idle tokens the runs are IDLE_RUN_LONG steps and take turns, IDLE_RUN_LONG
    idle tokens each, at being unwatched (a 200-token call crosses into that stretch): the
    back-off's and the chains' scoring get the run's tokens with watch=False (the real methods
    run; they are only spied on). The turns are counted on the idle count, which goes on across
    calls, so calls of 3 tokens take turns too (a per-call toggle would leave every short call's
    only run unwatched, and the means would never hear of a winning stretch again). A cost no
    tree can meet keeps the stretch idle."""
    seen = []

    def spy(cls, name):
        real = getattr(cls, name)

        def record(self, table, tokens, watch=True):
            seen.append((cls.__name__, len(tokens), watch))
            return real(self, table, tokens, watch)
        monkeypatch.setattr(cls, name, record)
    spy(TreeChooser, "observe_tokens")
    spy(ChainScores, "observe")
    V = 512
    model = _model(vocab=V, std=0.001 if temperature else 0.3)
    hopeless = dict(cost=TreeCost(pass_cost=9.0, node_cost=1.0), measure_cost=False, tree_size=20)
    want = plain_generate(model, [1, 2, 3], 200, seed=11, temperature=temperature)
    matrix = RecyclingMatrix(V, k=8)
    got, stats = token_recycling_generate(model, [1, 2, 3], max_new_tokens=200, temperature=temperature, seed=11,
                                          matrix=matrix, **hopeless)
    assert got.tolist() == want and not stats.tree_nodes and not stats.chain_passes
    assert all(matrix.table[t, 0] >= 0 for t in [1, 2, 3] + want[:-1])   # unwatched steps' rows recycled too
    calls = [(n, w) for name, n, w in seen if name == "TreeChooser"]
    assert calls == [(n, w) for name, n, w in seen if name == "ChainScores"]
    # the prefill's token; single steps to IDLE_AFTER idle tokens; runs of IDLE_RUN to IDLE_WATCH;
    # then runs of IDLE_RUN_LONG, the turns off, on, off, ...
    after, short_run, watch, long_run = (speculative.IDLE_AFTER, speculative.IDLE_RUN, speculative.IDLE_WATCH,
                                         speculative.IDLE_RUN_LONG)
    assert after < watch < 200 - 2 * long_run
    expect, idle, left = [(1, True)], 0, 199
    while left:
        n = 1 if idle < after else min(long_run if idle >= watch else short_run, left)
        expect.append((n, n == 1 or not (idle >= watch and (idle - watch) // long_run % 2 == 0)))
        idle, left = idle + n, left - n
    assert calls == expect
    assert sum(n for n, w in calls if not w) >= long_run
    assert (long_run, False) in calls and (long_run, True) in calls
    # calls of 3 tokens on a matrix already past IDLE_WATCH: the prefill's token, then one run of 2
    seen.clear()
    short = RecyclingMatrix(V, k=8)
    short.idle = speculative.IDLE_WATCH
    for s in range(24):
        token_recycling_generate(model, [5 + s], max_new_tokens=3, temperature=temperature, seed=s,
                                 matrix=short, **hopeless)
    runs = [w for name, n, w in seen if name == "TreeChooser" and n == 2]
    turn = long_run // 2      # calls per turn
    assert runs == ([False] * turn + [True] * turn) * (24 // (2 * turn)) + [False] * (24 % (2 * turn))
    assert short.idle == watch + 24 * 2


def test_never_matching_drafts_switch_to_plain_steps_within_8_passes():
    """A near-uniform model over 512 tokens: sampled tokens are almost never among the 8 recycled
    candidates. From the most optimistic back-off state (every budget expecting its template's
    depth), at most 8 passes are tree passes, all of them first; then plain steps only."""
    model = _model(vocab=512, std=0.001)
    matrix = RecyclingMatrix(512, k=8)
    # every row known (arbitrary candidates: under a near-uniform model any 8 are as good), so
    # trees have drafts to offer and only the back-off can stop them
    matrix.table[:] = torch.randint(0, 512, matrix.table.shape, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.int32)
    matrix.backoff = _optimistic(TreeChooser(20, 8, 8, TreeCost()))
    got, stats = token_recycling_generate(model, [1, 2, 3], max_new_tokens=60, temperature=1.0, seed=0,
                                          matrix=matrix, tree_size=20)
    trees = len(stats.tree_nodes)
    assert 1 <= trees <= 8 and stats.plain_passes == stats.target_passes - trees
    assert stats.accepted <= 1
    assert max(m for m, _ in matrix.backoff.values()) < 0.2   # the state handed to the next call says: plain
    assert matrix.measured.prior == default_cost("cpu") != TreeCost()   # no cost given: the device's prior
    # the next call sharing the matrix starts plain and stays plain
    _, again = token_recycling_generate(model, [4, 5], max_new_tokens=30, temperature=1.0, seed=1, matrix=matrix,
                                        tree_size=20)
    assert not again.tree_nodes and again.plain_passes == again.target_passes
