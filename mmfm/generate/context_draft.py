"""Drafts copied from the context: Token Recycling's second draft source.

The recycling matrix conditions a draft on one token (the row of the last emitted token), so on
text that repeats itself - code, lists, a weak model's greedy loops - it guesses one position at
a time from the model's past top-k. The context already holds the answer there: find the most
recent earlier occurrence of the longest suffix (up to `max_ngram` tokens) of prompt + output,
and draft the tokens that followed it (prompt lookup decoding, Saxena 2023; the retrieval
drafters Token Recycling's paper compares against; SAM-Decoding combines such a suffix match with
a second drafter as we do here). The copy runs LZ77-style: when the occurrence ends right before
the current end, the chain goes on copying from itself, so a period-p loop drafts a full chain.

The chain is merged into the matrix's draft tree as one more branch (merge_chain: nodes it
shares with the tree are reused), so one pass verifies both; a trie's root paths are the
tree's paths and the chain's prefixes, so the merged tree accepts max(tree's walk, chain's walk).
Drafts are deterministic, so verification and the output distribution are unchanged.

Whether a chain is worth its nodes is judged like the tree budgets (speculative_backoff.py):
every emitted token is scored against the chain that would have been drafted at its position
(a "shadow walk", at no model cost), and ChainScores keeps a running mean of those walks'
accepted drafts for every chain length cap in CAPS. An open walk is one pointer into the context:
while it matches, the chain it would have drafted equals the emitted tokens, so chain[j] is
context[start + j] whatever the self-copy, and a walk costs one comparison per token.
"""
from __future__ import annotations

import functools

import torch

from mmfm.generate.recycling import DraftTree

CAPS = (2, 4, 8, 16, 32)   # candidate chain lengths (the maximum is added)


class ContextIndex:
    """The call's context (prompt + emitted tokens) and, for n = 1..max_ngram, the end of the
    most recent occurrence of every n-gram that has a token after it. An n-gram is keyed by one
    int, its tokens + 1 as digits in base vocab_size + 1, so the keys of the suffixes after an
    append follow from those before it by one multiply-add each: an append is max_ngram dict
    writes and as many multiply-adds, a lookup max_ngram dict reads at most."""

    def __init__(self, tokens: list[int], vocab_size: int, max_ngram: int = 3):
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"max_ngram: expected an int >= 1, got {max_ngram!r}")
        self.base = vocab_size + 1
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.maps: list[dict[int, int]] = [{} for _ in range(max_ngram)]
        self._suffix: list[int] = []     # keys of the 1..max_ngram-grams ending at the end
        self.extend(tokens)

    def append(self, token: int) -> None:
        # the grams ending at the current end gain a follower now: index them, then extend, so a
        # lookup of the new suffix finds an earlier occurrence, never itself
        tokens, suf = self.tokens, self._suffix
        end = len(tokens)
        for m, k in zip(self.maps, suf):
            m[k] = end
        tokens.append(token)
        t1 = token + 1
        if self.max_ngram == 2:      # the default: one multiply-add
            self._suffix = [t1, suf[0] * self.base + t1] if suf else [t1]
        else:
            b = self.base
            self._suffix = [t1] + [k * b + t1 for k in suf[:self.max_ngram - 1]]

    def extend(self, tokens) -> None:
        toks = [int(t) for t in tokens]
        if self.tokens or not toks:
            for t in toks:
                self.append(t)
            return
        # a prompt into an empty index: each map in one dict comprehension (a later occurrence
        # overwrites an earlier one, as appends would), ~10x faster than token by token
        b, n = self.base, len(toks)
        keys = [t + 1 for t in toks]
        for g, m in enumerate(self.maps):          # g + 1-grams ending at end = i + g + 1 < n
            m.update({k: i + g + 1 for i, k in enumerate(keys[:n - g - 1])})
            keys = [k * b + t + 1 for k, t in zip(keys, toks[g + 1:])]
        self.tokens = toks
        # the keys of the suffixes ending at the end, as append leaves them
        self._suffix = []
        k = 0
        for g in range(min(self.max_ngram, n)):
            k += (toks[n - 1 - g] + 1) * b ** g
            self._suffix.append(k)

    def match(self) -> int:
        """Where the continuation of the longest matched suffix starts in the context, -1 if even
        the last token never occurred before."""
        maps, keys = self.maps, self._suffix
        for n in range(len(keys) - 1, -1, -1):
            p = maps[n].get(keys[n])
            if p is not None:
                return p
        return -1

    def chain(self, length: int) -> list[int]:
        """`length` tokens copied from where match() points, continuing from the copy itself once
        it reaches the end of the context; [] when nothing matched."""
        p = self.match()
        if p < 0 or length < 1:
            return []
        t, end = self.tokens, len(self.tokens)
        out = t[p:min(p + length, end)]
        while len(out) < length:       # the occurrence ran into the end: copy the copy
            out.append(out[len(out) - (end - p)])
        return out


@functools.lru_cache(maxsize=64)
def _chain_tensors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool [n, n] lower-triangular ancestor mask, int64 [n] depths 0..n-1) of an n-node chain,
    shared read-only by the trees that use them."""
    return torch.ones(n, n, dtype=torch.bool).tril_(), torch.arange(n)


def chain_tree(root: int, chain: list[int]) -> DraftTree:
    """A tree that is only the chain: root, then chain[0], chain[1], ... each the child of the last."""
    n = len(chain) + 1
    mask, depth = _chain_tensors(n)
    tok = [root] + chain
    return DraftTree(torch.tensor(tok), list(range(-1, n - 1)), depth, mask,
                     [[i + 1] for i in range(n - 1)] + [[]], tokens_list=tok)


def merge_chain(tree: DraftTree, chain: list[int]) -> DraftTree:
    """`tree` with `chain` (drafts after its root) added as a branch: the chain follows the tree's
    nodes while they hold its tokens and goes on as new nodes after the tree's (so the tree's
    node indices, and its nodes' place in the cache, stay as they were). Returns `tree` itself
    when the chain adds nothing. The new nodes form a chain below one tree node, so their mask
    rows are that node's row and a triangle: three tensor writes, not a per-node loop (a pass's
    host work is a visible share of a small model's step)."""
    tok, children = tree.tokens_list or tree.tokens.tolist(), tree.children
    cur, i = 0, 0
    while i < len(chain):
        nxt = next((c for c in children[cur] if tok[c] == chain[i]), -1)
        if nxt < 0:
            break
        cur, i = nxt, i + 1
    if i == len(chain):
        return tree
    new = chain[i:]
    n, m = len(tok), len(chain) - i
    mask = torch.zeros(n + m, n + m, dtype=torch.bool)
    mask[:n, :n] = tree.mask
    mask[n:, :n] = tree.mask[cur]
    mask[n:, n:] = _chain_tensors(m)[0]
    depth = torch.cat([tree.depth, _chain_tensors(m)[1] + (int(tree.depth[cur]) + 1)])
    children = [list(c) for c in children] + [[j + 1] for j in range(n, n + m - 1)] + [[]]
    children[cur].append(n)
    parent = list(tree.parent) + [cur] + list(range(n, n + m - 1))
    tok = list(tok) + new
    return DraftTree(torch.tensor(tok), parent, depth, mask, children, tree.expected, tok)


class ChainScores:
    """Running means, per chain length cap, of the drafts the context chain would have had
    accepted at each emitted token (its shadow walks; see the module docstring), and the choice
    of a cap. alpha and z as TreeChooser's: the newest walk's weight, and the standard errors
    below the mean a cap is judged by. Means are kept in lists by cap index: this runs for every
    emitted token, in sampling too, where it is pure overhead unless chains start to win."""

    def __init__(self, max_len: int, alpha: float = 0.3, z: float = 0.5, state: dict | None = None):
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
        self.caps = [c for c in CAPS if c < max_len] + [max_len]
        self.alpha, self.z, self.se_scale = alpha, float(z), (alpha / (2.0 - alpha)) ** 0.5
        self._ema = [0.0] * len(self.caps)
        self._sq = [0.0] * len(self.caps)
        if state and sorted(state) == self.caps:
            for i, c in enumerate(self.caps):
                self._ema[i], self._sq[i] = (float(v) for v in state[c])
        self._decays = 0              # walks closed with nothing accepted, not yet applied
        self.walks: list[list[int]] = []    # open walks: [next context position to match, accepted, caps settled]
        self._cache = None            # (cost, speed) at which best() last found no cap hopeful
        self._plain = False           # ... and no walk has accepted a draft since

    def _settle(self) -> None:
        if self._decays:
            f = (1.0 - self.alpha) ** self._decays
            self._decays = 0
            self._ema = [v * f for v in self._ema]
            self._sq = [v * f for v in self._sq]

    def observe(self, index: ContextIndex, tokens: list[int], watch: bool = True) -> None:
        """Emitted `tokens`, in order: each is appended to `index`, advances the open walks, and
        opens one at the new position (the chain that a pass there would draft). One call per
        pass, one loop: this runs for every emitted token, sampling included.

        A walk's value under cap c is known as soon as it has accepted c drafts or failed, and
        enters cap c's mean then: waiting for the walk to end would hold back, for up to the
        longest cap's tokens, exactly the walks that succeed while failures enter at once, and the
        means would lag far below what chains accept whenever they start to win.

        watch=False: the tokens only join the index; the open walks are dropped uncounted and
        none opens (long idle stretches watch every other run; see TreeChooser.observe_tokens)."""
        if not watch:
            self.walks = []
            index.extend(tokens)
            return
        caps = self.caps
        ncap = len(caps)
        t = index.tokens
        for token in tokens:
            index.append(token)
            walks = self.walks
            if walks:
                still = []
                for w in walks:
                    if t[w[0]] == token:
                        w[0] += 1
                        a = w[1] = w[1] + 1
                        if caps[w[2]] == a:
                            self._update(w[2], w[2] + 1, a)
                            w[2] += 1
                            if w[2] == ncap:
                                continue
                        still.append(w)
                    elif w[1] == 0:
                        self._decays += 1
                    else:
                        self._update(w[2], ncap, w[1])
                self.walks = still
            p = index.match()
            if p >= 0:
                self.walks.append([p, 0, 0])
            else:
                self._decays += 1

    def _update(self, lo: int, hi: int, x: int) -> None:
        """caps[lo:hi] each take one walk of value x."""
        if self._decays:
            self._settle()
        self._plain = False
        a, xx, ema, sq = self.alpha, x * x, self._ema, self._sq
        for i in range(lo, hi):
            ema[i] += a * (x - ema[i])
            sq[i] += a * (xx - sq[i])

    def _bound(self, i: int) -> float:
        m = self._ema[i]
        return m - self.z * self.se_scale * max(self._sq[i] - m * m, 0.0) ** 0.5

    def expected(self, cap: int) -> float:
        """The lower bound on cap's accepted drafts per chain that best() judges it by."""
        self._settle()
        return self._bound(self.caps.index(cap))

    def best(self, cost, extra_nodes: int, base: float, speed: float) -> tuple[int, float]:
        """(cap, tokens per plain step) of the best chain to add to a pass of `extra_nodes` nodes
        already (1: a plain step) whose expected accepted drafts are `base`, if it beats `speed`;
        else (0, speed). The merged pass is judged to accept max(base, the chain's), a lower
        bound: the real walk takes whichever of the two goes further at each position."""
        key = (id(cost), cost.pass_cost, cost.node_cost, speed)
        if self._plain and key == self._cache:
            return 0, speed
        self._settle()
        best, hopeful, ema = 0, False, self._ema
        for i, c in enumerate(self.caps):
            m = ema[i]
            if m <= base or (1.0 + m) / cost(extra_nodes + c) <= speed:
                continue
            hopeful = True
            s = (1.0 + max(base, self._bound(i))) / cost(extra_nodes + c)
            if s > speed:
                best, speed = c, s
        if extra_nodes == 1 and not hopeful:   # means only fall until a walk accepts a draft
            self._plain, self._cache = True, key
        return best, speed

    def state(self) -> dict[int, tuple[float, float]]:
        self._settle()
        return {c: (self._ema[i], self._sq[i]) for i, c in enumerate(self.caps)}
