"""Token Recycling's draft source: an adjacency matrix of recycled candidates and a static tree.

The matrix holds, for every token t, the top-k tokens the target model ranked highest right
after some occurrence of t (int32 [V, k], -1 = never seen). Each verification pass sees the
logits of every tree node, so its top-k rows replace the matrix rows of those nodes' tokens:
candidates the model already computed are "recycled" as future drafts at no extra model cost.

Two tree shapes:

  * static (the paper's): a fixed template of (parent, rank) nodes, chosen once; filling it is a
    BFS over the matrix: the root is the last emitted token, and node (parent, r) gets
    matrix[token(parent), r]. Nodes whose matrix entry is unknown are dropped together with
    their subtrees, so the tree shrinks while the matrix is cold and never drafts a made-up token.
  * dynamic (DySpec's greedy expansion): the matrix also keeps the probability the target gave
    each recycled candidate; a node's value is the product of those probabilities along its
    path - under one-hot drafts, the chance that the node ends up on the accepted path if the
    recycled probabilities still hold - and the tree grows best-first by value up to the node
    budget. Where the target was confident the tree goes deep, where it was not it goes wide or
    stops, instead of the template's one shape for every context.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import torch

# How often the rank-r recycled candidate turns out to be the next token, roughly (the
# template only needs the order of node scores to be sensible, not exact values).
RANK_PRIOR = (0.55, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)


class RecyclingMatrix:
    """int32 [vocab_size, k] top-k successor table; -1 marks rows never updated."""

    def __init__(self, vocab_size: int, k: int = 8, device="cpu"):
        if vocab_size < 1:
            raise ValueError(f"RecyclingMatrix: vocab_size must be >= 1, got {vocab_size}")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"RecyclingMatrix: k must lie in [1, vocab_size={vocab_size}], got {k}")
        self.table = torch.full((vocab_size, k), -1, dtype=torch.int32, device=device)
        # the target's probability of each candidate when it was recycled (dynamic trees' values)
        self.probs = torch.zeros((vocab_size, k), dtype=torch.float32, device=device)
        # the adaptive back-off's state (node budget -> running means of accepted drafts and their squares;
        # speculative_backoff.py): it travels with the matrix, so a hot start also remembers
        # whether trees were winning on this kind of text
        self.backoff: dict | None = None
        # the back-off's measured tree cost (speculative_backoff.MeasuredCost): a property of the
        # model and the machine, so it too carries over to the next call
        self.measured = None
        # tokens since the back-off last saw a budget worth a tree (token_recycling_generate's idle
        # runs): a hopeless stretch, like sampling at temperature 1 from a small model, goes on
        # into the next call
        self.idle = 0
        # the context drafts' running means (context_draft.ChainScores.state()), like backoff
        self.context = None

    @property
    def k(self) -> int:
        return self.table.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the candidate table (the paper's figure; the probability table doubles it)."""
        return self.table.numel() * self.table.element_size()

    @torch.no_grad()
    def update(self, tokens, logits: torch.Tensor, temperature: float | None = None,
               top=None, rows: HostRows | None = None) -> None:
        """Row tokens[i] <- the k highest-logit tokens of logits[i] (tokens: [N] ids as a tensor or
        a list, logits [N, V]), and, when temperature is given, their probabilities
        softmax(logits[i] / temperature) (0 counts as 1) for dynamic trees; the static tree needs
        no probabilities, so it skips their cost. A token occurring more than once keeps the row
        of its last occurrence (the most recent context). top: logits.topk(k) when the caller
        already has it (greedy verification reads its draws from it).

        rows: the call's HostRows. The rows then go to it as host lists and reach the table when
        rows.sync() is called (once, at the end of a generate call): inside the decode loop the
        tensor side of a write (the index tensor, picking the last occurrences, the index_put)
        measured 3x the ranking itself (~140 of ~190 us per 16-row write on the byte-level
        bench model), and every read during the call goes through the HostRows anyway. A
        prompt's repeated tokens are still ranked once each (topk costs ~7 us per row of a
        3784-token vocabulary)."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"RecyclingMatrix.update: logits have {logits.shape[-1]} columns, the matrix "
                             f"was built for vocab_size={self.vocab_size}")
        z = logits.reshape(-1, logits.shape[-1])
        toks = tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        last = {t: i for i, t in enumerate(toks)}
        if len(last) < len(toks) and (rows is None or len(toks) - len(last) >= 16):
            sel = torch.tensor(list(last.values()), device=z.device)
            z = z.index_select(0, sel)
            toks = list(last)
            if top is not None:
                top = (top[0].index_select(0, sel), top[1].index_select(0, sel))
        probs = None
        if temperature is None:
            idx = (z.topk(self.k, dim=-1) if top is None else top)[1]
        else:
            z = z.float()
            if temperature and temperature != 1.0:
                z = z / temperature
            if top is None:
                values, idx = z.topk(self.k, dim=-1)
            else:
                values, idx = top[0].float(), top[1]
                if temperature and temperature != 1.0:
                    values = values / temperature
            probs = (values - z.logsumexp(-1, keepdim=True)).exp_()
        if rows is not None:
            rows.write(toks, idx.tolist(), None if probs is None else probs.tolist())
            return
        index = torch.tensor(toks, dtype=torch.long, device=self.table.device)
        self.table[index] = idx.to(self.table.device, torch.int32)
        if probs is not None:
            self.probs[index] = probs.to(self.probs.device)


class HostRows:
    """Host copies of matrix rows for one generate call: row(t) -> list of k ints, prob(t) ->
    list of k floats (dynamic trees).

    The loop reads a row per emitted token (the back-off's shadow walks) and per distinct tree
    parent, and a tensor read plus .tolist() per row costs more than the Python around it; rows
    are read from the tensors once, and RecyclingMatrix.update(rows=...) writes to these copies
    only. sync() writes the rows written since the last sync to matrix.table (and matrix.probs)
    in one index_put each; the loop calls it once at the end. Build a new one per call: writes to
    the tensors by other means are not seen."""

    def __init__(self, matrix: RecyclingMatrix):
        self.matrix = matrix
        self.rows: dict[int, list[int]] = {}
        self.probs: dict[int, list[float]] = {}
        self.pending: set[int] = set()        # tokens written, not yet in the tensors

    def __call__(self, t: int) -> list[int]:
        r = self.rows.get(t)
        if r is None:
            r = self.rows[t] = self.matrix.table[t].tolist()
        return r

    def prob(self, t: int) -> list[float]:
        p = self.probs.get(t)
        if p is None:
            p = self.probs[t] = self.matrix.probs[t].tolist()
        return p

    def write(self, tokens: list[int], rows: list[list[int]], probs: list[list[float]] | None = None) -> None:
        """Rows (and probabilities) of `tokens`, in order: a repeated token keeps its last."""
        self.rows.update(zip(tokens, rows))
        if probs is not None:
            self.probs.update(zip(tokens, probs))
        self.pending.update(tokens)

    def sync(self) -> None:
        """Write the pending rows to the matrix's tensors."""
        if not self.pending:
            return
        m = self.matrix
        toks = list(self.pending)
        index = torch.tensor(toks, dtype=torch.long, device=m.table.device)
        m.table[index] = torch.tensor([self.rows[t] for t in toks], dtype=torch.int32, device=m.table.device)
        # one call writes probabilities with every row or with none (its temperature is fixed); a
        # row read back through prob() is written back unchanged
        with_probs = [t for t in toks if t in self.probs]
        if with_probs:
            m.probs[torch.tensor(with_probs, dtype=torch.long, device=m.probs.device)] = torch.tensor(
                [self.probs[t] for t in with_probs], dtype=torch.float32, device=m.probs.device)
        self.pending.clear()


@dataclass(frozen=True)
class TreeTemplate:
    """A static draft-tree shape in BFS order (parents before children); node 0 is the root."""
    parent: tuple[int, ...]      # -1 for the root
    rank: tuple[int, ...]        # which matrix column fills the node (root: -1)
    depth: tuple[int, ...]
    # when best-first growth added each node (root 0): the template of size n is exactly the
    # nodes of order < n, so one walk along a big template also scores every smaller one
    order: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.parent)

    @functools.cached_property
    def child(self) -> dict[tuple[int, int], int]:
        """(node, rank) -> child node."""
        return {(p, r): i for i, (p, r) in enumerate(zip(self.parent, self.rank)) if p >= 0}


@functools.lru_cache(maxsize=32)
def tree_template(size: int = 40, k: int = 8, max_depth: int = 8) -> TreeTemplate:
    """The `size` nodes (root included) of highest prior path probability, prod RANK_PRIOR[rank]
    along the path; best-first growth, so every node's parent is in the tree. Like the paper's
    hand-made tree, it is wide near the root and deep along the rank-0 path."""
    if size < 1 or k < 1 or max_depth < 1:
        raise ValueError(f"tree_template: size, k and max_depth must be >= 1, got {size}, {k}, {max_depth}")
    prior = [RANK_PRIOR[r] if r < len(RANK_PRIOR) else RANK_PRIOR[-1] * 0.7 ** (r - len(RANK_PRIOR) + 1)
             for r in range(k)]
    # heap of (-score, tiebreak, path as tuple of ranks)
    chosen = [()]
    heap = [(-prior[r], r, (r,)) for r in range(k)]
    heapq.heapify(heap)
    tie = k
    while len(chosen) < size and heap:
        neg, _, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(k):
                tie += 1
                heapq.heappush(heap, (neg * prior[r], tie, path + (r,)))
    added = {p: i for i, p in enumerate(chosen)}
    chosen.sort(key=lambda p: (len(p), p))          # BFS order: by depth, then by ranks
    index = {p: i for i, p in enumerate(chosen)}
    parent = tuple(-1 if not p else index[p[:-1]] for p in chosen)
    rank = tuple(-1 if not p else p[-1] for p in chosen)
    depth = tuple(len(p) for p in chosen)
    return TreeTemplate(parent, rank, depth, tuple(added[p] for p in chosen))


@dataclass
class DraftTree:
    tokens: torch.Tensor        # int64 [n]: root (the last emitted token) then the drafts
    parent: list[int]           # -1 for the root
    depth: torch.Tensor         # int64 [n]
    mask: torch.Tensor          # bool [n, n]: node i sees node j iff j is i or an ancestor of i
    children: list[list[int]]   # child node indices of each node, in rank order
    expected: float = 0.0       # dynamic trees: sum of the drafts' path values (estimated accepted drafts)
    tokens_list: list[int] | None = None   # `tokens` as a host list (the walk reads it)


def ancestor_mask(parent: list[int]) -> torch.Tensor:
    n = len(parent)
    m = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):       # parents come first, so their rows are complete
        m[i] |= m[parent[i]]
    return m


@functools.lru_cache(maxsize=32)
def _template_mask(template: TreeTemplate) -> torch.Tensor:
    return ancestor_mask(list(template.parent))


@functools.lru_cache(maxsize=32)
def _template_tensors(template: TreeTemplate) -> tuple[torch.Tensor, torch.Tensor]:
    """(ancestor mask, int64 depths) of the whole template, shared read-only by its trees."""
    return _template_mask(template), torch.tensor(template.depth)


def _mask_from_parents(parent: list[int]) -> torch.Tensor:
    """bool [n, n] ancestor mask built in Python lists and written with one index op."""
    anc: list[list[int]] = []
    rows, cols = [], []
    for i, p in enumerate(parent):
        a = ([] if p < 0 else anc[p]) + [i]
        anc.append(a)
        rows += [i] * len(a)
        cols += a
    m = torch.zeros(len(parent), len(parent), dtype=torch.bool)
    m[rows, cols] = True
    return m


@torch.no_grad()
def build_dynamic_tree(matrix: RecyclingMatrix, root: int, size: int, max_depth: int = 8,
                       min_value: float = 0.0, rows: HostRows | None = None) -> DraftTree:
    """DySpec's greedy expansion over the recycled candidates: up to `size` nodes (root
    included), each added node being the frontier candidate of highest path value (product of
    the recycled probabilities from the root); parents come before their children, so the
    order is a valid tree order for the mask and the walk. Growth stops early when the best
    candidate's value is below min_value (DySpec's threshold: a node that would be accepted
    that rarely is not worth its share of the pass). Unknown entries (-1) and zero
    probabilities are never drafted; the matrix must have been updated with a temperature."""
    if size < 1 or max_depth < 1:
        raise ValueError(f"build_dynamic_tree: size and max_depth must be >= 1, got {size}, {max_depth}")
    row_of = rows or HostRows(matrix)
    cand: dict[int, tuple[list[int], list[float]]] = {}
    tok, parent, depth, value = [root], [-1], [0], [1.0]
    heap: list = []
    tie = 0

    def push(i: int) -> None:
        nonlocal tie
        if depth[i] >= max_depth:
            return
        t = tok[i]
        row = cand.get(t)
        if row is None:
            row = cand[t] = (row_of(t), row_of.prob(t))
        for c, pc in zip(*row):
            if c >= 0 and pc > 0:
                tie += 1
                heapq.heappush(heap, (-value[i] * pc, tie, i, c))

    push(0)
    while len(tok) < size and heap and -heap[0][0] >= min_value:
        neg, _, par, t = heapq.heappop(heap)
        tok.append(t)
        parent.append(par)
        depth.append(depth[par] + 1)
        value.append(-neg)
        push(len(tok) - 1)
    return tree_from_parents(tok, parent, depth, sum(value[1:]))


def tree_from_parents(tok: list[int], parent: list[int], depth: list[int], expected: float = 0.0) -> DraftTree:
    """A DraftTree from host lists of tokens, parents (-1 for the root; parents before children)
    and depths: the form trees grown node by node are built in (dynamic trees, draft-model trees)."""
    children: list[list[int]] = [[] for _ in tok]
    for i, p in enumerate(parent[1:], start=1):
        children[p].append(i)
    return DraftTree(torch.tensor(tok), parent, torch.tensor(depth), _mask_from_parents(parent), children,
                     expected, tok)


@torch.no_grad()
def build_tree(matrix: RecyclingMatrix, root: int, template: TreeTemplate, rows: HostRows | None = None) -> DraftTree:
    """BFS over the matrix along the template; unknown entries prune their subtree. Plain Python
    over the (small) template: one matrix row read per distinct parent token (from `rows`, the
    call's HostRows, when given), no per-node tensor ops, since this runs once per generated
    block and must stay cheap next to a forward pass."""
    row_of = rows or HostRows(matrix)
    tok = [root]
    keep = [0]
    new_index = {0: 0}
    parent = [-1]
    for i in range(1, len(template)):
        p = template.parent[i]
        if p not in new_index:
            continue                            # the parent was pruned
        t = row_of(tok[new_index[p]])[template.rank[i]]
        if t < 0:
            continue
        new_index[i] = len(keep)
        keep.append(i)
        tok.append(t)
        parent.append(new_index[p])
    children: list[list[int]] = [[] for _ in keep]
    for i, p in enumerate(parent[1:], start=1):
        children[p].append(i)
    mask, depth = _template_tensors(template)
    if len(keep) < len(template):     # some subtrees pruned
        idx = torch.tensor(keep)
        mask, depth = mask[idx][:, idx], depth[idx]
    return DraftTree(torch.tensor(tok), parent, depth, mask, children, tokens_list=tok)
