"""Token Recycling's draft source: an adjacency matrix of recycled candidates and a static tree.

The matrix holds, for every token t, the top-k tokens the target model ranked highest right
after some occurrence of t (int32 [V, k], -1 = never seen). Each verification pass sees the
logits of every tree node, so its top-k rows replace the matrix rows of those nodes' tokens:
candidates the model already computed are "recycled" as future drafts at no extra model cost.

The draft tree has a fixed shape (a template of (parent, rank) nodes, chosen once); filling it
is a BFS over the matrix: the root is the last emitted token, and node (parent, r) gets
matrix[token(parent), r]. Nodes whose matrix entry is unknown are dropped together with their
subtrees, so the tree shrinks while the matrix is cold and never drafts a made-up token.
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

    @property
    def k(self) -> int:
        return self.table.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Row tokens[i] <- the k highest-logit tokens of logits[i] ([N] ids, [N, V] logits).
        A token occurring twice keeps one of its rows; both are fresh candidates, so either is fine."""
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"RecyclingMatrix.update: logits have {logits.shape[-1]} columns, the matrix "
                             f"was built for vocab_size={self.vocab_size}")
        top = logits.reshape(-1, logits.shape[-1]).topk(self.k, dim=-1).indices
        self.table[tokens.reshape(-1).to(self.table.device, torch.long)] = top.to(self.table.device, torch.int32)


@dataclass(frozen=True)
class TreeTemplate:
    """A static draft-tree shape in BFS order (parents before children); node 0 is the root."""
    parent: tuple[int, ...]      # -1 for the root
    rank: tuple[int, ...]        # which matrix column fills the node (root: -1)
    depth: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.parent)


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
    chosen.sort(key=lambda p: (len(p), p))          # BFS order: by depth, then by ranks
    index = {p: i for i, p in enumerate(chosen)}
    parent = tuple(-1 if not p else index[p[:-1]] for p in chosen)
    rank = tuple(-1 if not p else p[-1] for p in chosen)
    depth = tuple(len(p) for p in chosen)
    return TreeTemplate(parent, rank, depth)


@dataclass
class DraftTree:
    tokens: torch.Tensor        # int64 [n]: root (the last emitted token) then the drafts
    parent: list[int]           # -1 for the root
    depth: torch.Tensor         # int64 [n]
    mask: torch.Tensor          # bool [n, n]: node i sees node j iff j is i or an ancestor of i
    children: list[list[int]]   # child node indices of each node, in rank order


def ancestor_mask(parent: list[int]) -> torch.Tensor:
    n = len(parent)
    m = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):       # parents come first, so their rows are complete
        m[i] |= m[parent[i]]
    return m


@functools.lru_cache(maxsize=32)
def _template_mask(template: TreeTemplate) -> torch.Tensor:
    return ancestor_mask(list(template.parent))


@torch.no_grad()
def build_tree(matrix: RecyclingMatrix, root: int, template: TreeTemplate) -> DraftTree:
    """BFS over the matrix along the template; unknown entries prune their subtree. Plain Python
    over the (small) template: one matrix row read per distinct parent token, no per-node tensor
    ops, since this runs once per generated block and must stay cheap next to a forward pass."""
    table = matrix.table
    rows: dict[int, list[int]] = {}
    tok = [root]
    keep = [0]
    new_index = {0: 0}
    parent = [-1]
    for i in range(1, len(template)):
        p = template.parent[i]
        if p not in new_index:
            continue                            # the parent was pruned
        pt = tok[new_index[p]]
        row = rows.get(pt)
        if row is None:
            row = rows[pt] = table[pt].tolist()
        t = row[template.rank[i]]
        if t < 0:
            continue
        new_index[i] = len(keep)
        keep.append(i)
        tok.append(t)
        parent.append(new_index[p])
    children: list[list[int]] = [[] for _ in keep]
    for i, p in enumerate(parent[1:], start=1):
        children[p].append(i)
    idx = torch.tensor(keep)
    mask = _template_mask(template)
    depth = torch.tensor([template.depth[i] for i in keep])
    return DraftTree(torch.tensor(tok), parent, depth, mask[idx][:, idx], children)
