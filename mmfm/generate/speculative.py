"""Lossless speculative decoding: Token Recycling (draft trees from recycled candidates) and a
draft-model mode (a smaller mmfm model drafts a chain).

Both emit tokens distributed exactly as plain sampling from the target under the same settings
(temperature, top_k, top_p, min_p, typical_p; the distribution of mmfm.ops.sampling.processed_probs),
and with temperature 0 exactly the plain greedy tokens:

  * Token Recycling drafts are deterministic, so a node's children x_1..x_K (distinct tokens) are
    K drafts with one-hot draft distributions; recursive rejection sampling with q_i =
    onehot(x_i) accepts x_i with probability p(x_i) and otherwise removes x_i from the residual,
    which is the same as one draw t ~ p accepted as the child holding t. So every node gets one
    draw from a single `sample` call and the walk descends while the draw is a child: sequential
    sampling along the tree. The target's passes run through DenseStep (the plain loop's step;
    DenseStep.tree for the tree pass).
  * Draft-model drafts are sampled from the drafter's processed distribution q and verified with
    verify_chain (accept with min(1, p/q), residual norm(max(0, p - q))).

Batch size 1 (a prompt is one sequence). Stats report the acceptance length (tokens emitted per
target verification pass) so speed-ups can be read off independently of timing.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import torch

from mmfm.generate.context_draft import ChainScores, ContextIndex, chain_tree, merge_chain
from mmfm.generate.decode import modality_ids
from mmfm.generate.recycling import (HostRows, RecyclingMatrix, build_dynamic_tree, build_tree, tree_from_parents,
                                    tree_template)
from mmfm.generate.speculative_backoff import MeasuredCost, TreeChooser, TreeCost, default_cost
from mmfm.generate.step import DenseStep
from mmfm.models.kv_cache import KVCache
from mmfm.ops import sampling


@dataclass
class SpecStats:
    new_tokens: int = 0          # tokens returned
    target_passes: int = 0       # target forward passes after the prefill (verification passes)
    draft_passes: int = 0        # drafter forward passes (draft-model mode)
    drafted: int = 0             # draft tokens offered to the target
    accepted: int = 0            # draft tokens the target accepted
    tree_nodes: list[int] = field(default_factory=list, repr=False)   # nodes per pass (recycling)
    plain_passes: int = 0        # recycling passes the adaptive back-off ran without drafts
    gated_passes: int = 0        # dynamic trees: passes run without drafts as too few were expected to pass
    run_steps: int = 0           # plain passes taken in idle runs (read back together; IDLE_RUN)
    chain_passes: int = 0        # recycling passes whose tree held a chain copied from the context
    chain_accepted: int = 0      # drafts accepted beyond what the pass's matrix tree alone would have

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per verification pass (accepted drafts + the target's own token);
        plain decoding is 1.0. The first token comes from the prefill and is not counted."""
        return (self.new_tokens - 1) / self.target_passes if self.target_passes else 0.0

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "target_passes": self.target_passes,
                "draft_passes": self.draft_passes, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_length": round(self.acceptance_length, 4),
                "mean_tree_nodes": round(sum(self.tree_nodes) / len(self.tree_nodes), 2) if self.tree_nodes else 0,
                "plain_passes": self.plain_passes, "gated_passes": self.gated_passes, "run_steps": self.run_steps,
                "chain_passes": self.chain_passes, "chain_accepted": self.chain_accepted}


def sampling_settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, allowed_mask=None) -> dict:
    """The settings shared by plain sampling and verification (history penalties are not
    supported here: they would need each tree node's own history). allowed_mask (bool [V]) is
    the constraint plain decoding applies (e.g. text ids + <end_text> + <eos> for a text row)."""
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                allowed_mask=allowed_mask)


def prompt_tensor(prompt_ids, vocab_size: int, device) -> torch.Tensor:
    """int64 [1, L] from a list, a [L] tensor or a [1, L] tensor; names the argument on error."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"prompt_ids: expected a non-empty sequence of token ids ([L] or [1, L]; batch 1), "
                         f"got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"prompt_ids: token ids must lie in [0, vocab_size={vocab_size}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def _check_common(max_new_tokens: int, seed) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")


_INF = float("inf")


class _Rng:
    """(seed, offset) pairs for the sampling ops: one fresh offset per random call."""

    def __init__(self, seed: int | None):
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self.offset = 0

    def next(self) -> dict:
        self.offset += 1
        return {"seed": self.seed, "offset": self.offset}

    def at(self, emitted: int, depth: torch.Tensor | None = None) -> dict:
        """Draws keyed by position: the new token number `emitted` (0 = the first after the
        prompt) draws from the Philox stream (seed, emitted), and a tree node at `depth` below a
        root whose draw is token number `emitted` from (seed, emitted + depth): the stream
        mmfm.generate.decode's plain loop draws that token from (offset = step). So which passes
        produced a sequence (plain steps, trees of any shape) does not change the sequence: the
        tokens are the plain loop's, unless a logit differs in rounding between the passes and a
        uniform falls within that rounding of a CDF boundary."""
        return {"seed": self.seed, "offset": emitted if depth is None else depth + emitted}


def _finish(out: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Cut at max_new_tokens and after the first eos; (tokens, stop)."""
    if eos_id is not None and eos_id in out:
        return out[:min(out.index(eos_id) + 1, max_new_tokens)], True
    return out[:max_new_tokens], len(out) >= max_new_tokens


# ------------------------------------------------------------------------------ Token Recycling
class _Target:
    """The target model's passes for batch-1 speculative decoding: through DenseStep (the plain
    decode loop's step, mmfm/generate/step.py) for dense models, through Transformer.forward for
    modality-sparse ones. `length` mirrors cache.lengths[0] on the host, so no pass reads it back."""

    def __init__(self, model, cache: KVCache, modality_table):
        self.model, self.cache, self.table = model, cache, modality_table
        self.step = DenseStep(model, cache.capacity) if model.cfg.groups == 1 else None
        self.length = 0

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, L] -> logits [L, V]."""
        logits = self.model(ids, modality_ids=modality_ids(self.model, ids, self.table), cache=self.cache)[0]
        self.length = ids.shape[1]
        return logits

    def one(self, token: torch.Tensor) -> torch.Tensor:
        """token [1] int64 -> logits [1, V] (a plain decode step)."""
        if self.step is not None:
            lg = self.step(token, self.cache, self.length + 1, False)
        else:
            x = token[None]
            lg = self.model(x, modality_ids=modality_ids(self.model, x, self.table), cache=self.cache)[0]
        self.length += 1
        return lg

    def tree(self, tree) -> torch.Tensor:
        """All nodes of `tree` in one pass -> logits [n, V]; the caller then calls keep()."""
        dev = self.cache.k.device
        tokens, depth, mask = tree.tokens.to(dev), tree.depth.to(dev), tree.mask.to(dev)
        if self.step is not None:
            return self.step.tree(tokens, self.cache, self.length, depth, mask)
        x = tokens[None]
        return self.model(x, modality_ids=modality_ids(self.model, x, self.table), attn_mask=mask[None],
                          positions=self.length + depth[None], cache=self.cache)[0]

    def keep(self, path: list[int]) -> None:
        """Compact the accepted nodes (tree indices, ascending, root first) to the front of the
        tree's slots. A path along the first nodes is already in place (chains, the rank-0 spine
        of small trees): only the length moves."""
        self.cache.keep(0, self.length, path)       # sets the row's length
        self.length += len(path)


def _walk(dt, draws: list[int], out: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Verify a tree of deterministic drafts: from the root, emit the draw at each node reached and
    descend while the draw is one of its children (one draw t ~ p per node, accepted as the child
    holding t: recursive rejection sampling over one-hot drafts). Appends to `out`; returns (the
    accepted path as node indices, root first; whether generation stops)."""
    tokens, children = dt.tokens_list, dt.children
    cur, path = 0, [0]
    while True:
        t = draws[cur]
        out.append(t)
        if t == eos_id or len(out) >= max_new_tokens:
            return path, True
        cur = next((c for c in children[cur] if tokens[c] == t), -1)
        if cur < 0:
            return path, False
        path.append(cur)


TREES = ("static", "dynamic")
# idle runs: once no tree budget has been hopeful for IDLE_AFTER tokens (TreeChooser.idle; the
# count goes on across calls sharing a matrix), plain steps run IDLE_RUN at a time, their tokens
# read back together. Picked on the bench models (same-process A/B, docs/benchmarks.md, ##
# speculative, session 11): sampling at temperature 1 on the byte model 0.954x the plain loop
# against 0.937x without runs; greedy on the long export, whose hopeless stretches end often
# and where a late tree costs, unchanged at 32 (1.162x against 1.166x) but 1.11x when runs began
# after 8 tokens
IDLE_RUN = 8
IDLE_AFTER = 32
# long idle stretches, past IDLE_WATCH tokens: runs of IDLE_RUN_LONG steps, every other turn of
# IDLE_RUN_LONG idle tokens unwatched (no shadow walk there: TreeChooser.observe_tokens and
# ChainScores.observe with watch=False), the matrix rows batched 32 at a time, and the plain
# step time refitted every IDLE_METER steps. After a decode step has swept the caches a run's
# bookkeeping costs several times what it costs warm: ~16 us a token against a ~315 us step on
# the byte-level bench model, ~12 us with these (docs/benchmarks.md, ## speculative, session
# 13). The back-off hears of a winning stretch at most 2 * IDLE_RUN_LONG tokens late there:
# from 64 idle tokens that cost ~1% at temperature 0.6 on the byte model, where trees win after
# the stretches; from 128 nothing measurable, and temperature 1 gains as much
IDLE_WATCH = 128
IDLE_RUN_LONG = 16
IDLE_METER = 64
# context drafts (context_draft.py): the longest chain copied from the context, and the longest
# suffix matched to find where to copy from
CONTEXT_DRAFT = 16
CONTEXT_NGRAM = 2
GREEDY_VALUE_TEMPERATURE = 0.25   # dynamic trees in greedy decoding: the temperature of the node values (picked on the demo export among 1, 0.5, 0.25, 0.1)


@torch.no_grad()
def token_recycling_generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, min_p: float = 0.0, typical_p: float = 1.0, seed: int | None = None,
                             eos_id: int | None = None, matrix: RecyclingMatrix | None = None, tree_size: int = 40,
                             k: int = 8, max_depth: int = 8, warm_from_prompt: bool = True,
                             modality_table: torch.Tensor | None = None,
                             allowed_mask: torch.Tensor | None = None, adaptive: bool = True,
                             cost: TreeCost | None = None,
                             tree: str = "static", min_value: float = 0.0,
                             min_expected: float = 0.0, measure_cost: bool = True,
                             context_draft: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Generate up to max_new_tokens after prompt_ids with Token Recycling; returns (int64 [n]
    new tokens, SpecStats). `matrix` (a RecyclingMatrix) is updated in place, so passing the same
    one across calls keeps its candidates (the paper's hot start); warm_from_prompt also fills it
    from the prefill's logits. tree_size / k / max_depth shape the draft tree; tree = "static"
    (the paper's template) or "dynamic" (DySpec's greedy expansion by recycled probabilities,
    recycling.build_dynamic_tree; min_value stops its growth at nodes whose estimated chance of
    acceptance is below it, so a dynamic tree may use fewer than tree_size nodes; when the
    tree's expected accepted drafts, the sum of its node values, is below min_expected, the pass
    is a plain one-token step).

    Verification: the drafts are deterministic (one-hot draft distributions), and recursive
    rejection sampling over one-hot drafts x_1..x_K accepts x_i with probability p(x_i) and
    otherwise draws from p with the x_i removed - which is one draw t ~ p, accepted as the child
    holding t if there is one. So one `sample` call draws a token at every node (temperature 0:
    the argmax, the plain loop's op and tie rule), and the walk descends while the drawn token is
    a child. A node's draw is used only if the walk reaches it, and draws are independent, so the
    emitted tokens are distributed exactly as plain sampling (tests/test_speculative.py).

    Adaptive back-off (adaptive=True; mmfm/generate/speculative_backoff.py): before each pass a
    TreeChooser picks a plain DenseStep step or a tree of some budget up to tree_size, from
    running means of how many drafts a tree rooted at each emitted token would have accepted
    (scored against the emitted tokens themselves, so plain stretches keep measuring at no model
    cost) against `cost` (a TreeCost: a tree pass's cost in plain steps). A losing tree shrinks,
    then stops; a winning one returns within a few tokens. The running means travel with the
    matrix (matrix.backoff). measure_cost (default): `cost` (default: the device's prior,
    speculative_backoff.default_cost) is only the prior; every pass is timed and the tree pass cost refitted from the times (MeasuredCost, kept on the
    matrix as matrix.measured), so the back-off judges trees by what they cost on this model and
    machine. Draws are keyed by position (_Rng.at), so the tokens do not depend on which passes
    ran: with a seed they are the plain decode loop's. adaptive=False: a tree of tree_size every pass.

    Context drafts (context_draft: the longest chain; default CONTEXT_DRAFT with the back-off on,
    0 without; 0: matrix trees only; mmfm/generate/context_draft.py): a chain copied from after
    the last earlier occurrence of the context's longest suffix (prompt + output, up to
    CONTEXT_NGRAM tokens) joins the pass's tree as one more branch, or makes a pass on its own. With the back-off on, its length
    (or none) is chosen per pass like the tree budgets, by running means of what the chain would
    have had accepted at every emitted token; with adaptive=False and context_draft > 0 every
    pass carries the full chain."""
    _check_common(max_new_tokens, seed)
    settings = sampling_settings(temperature, top_k, top_p, min_p, typical_p, allowed_mask)
    V = model.cfg.vocab_size
    device = next(model.parameters()).device
    ids = prompt_tensor(prompt_ids, V, device)
    if matrix is None:
        matrix = RecyclingMatrix(V, k, device="cpu")
    elif matrix.vocab_size != V:
        raise ValueError(f"matrix: built for vocab_size={matrix.vocab_size}, the model has {V}")
    if tree not in TREES:
        raise ValueError(f"tree: expected one of {', '.join(TREES)}, got {tree!r}")
    if not isinstance(tree_size, int) or tree_size < 1:
        raise ValueError(f"tree_size: expected an int >= 1, got {tree_size!r}")
    if context_draft is None:      # the paper's fixed tree every pass stays the paper's
        context_draft = CONTEXT_DRAFT if adaptive else 0
    if not isinstance(context_draft, int) or context_draft < 0:
        raise ValueError(f"context_draft: expected an int >= 0 (the longest context chain; 0: none), "
                         f"got {context_draft!r}")
    if cost is not None and not isinstance(cost, TreeCost):
        raise TypeError(f"cost: expected a TreeCost or None, got {type(cost).__name__}")
    dynamic = tree == "dynamic"
    chooser = None
    prior = cost or default_cost(device)
    if adaptive and tree_size > 1:
        chooser = TreeChooser(tree_size, matrix.k, max_depth, prior, state=matrix.backoff,
                              last_token=int(ids[0, -1]))
    meter = None
    if chooser is not None and measure_cost:
        meter = matrix.measured
        if not isinstance(meter, MeasuredCost) or meter.prior != prior:
            meter = matrix.measured = MeasuredCost(prior)
        chooser.set_cost(meter)
    rng = _Rng(seed)
    stats = SpecStats()
    ctx = chains = None
    if context_draft:
        ctx = ContextIndex(ids[0].tolist(), V, CONTEXT_NGRAM)
        if chooser is not None:
            chains = ChainScores(context_draft, state=matrix.context)
    cost_of = meter if meter is not None else prior
    cache = KVCache.for_model(model, batch=1,
                              capacity=ids.shape[1] + max_new_tokens + tree_size + context_draft + 1)
    target = _Target(model, cache, modality_table)
    logits = target.prefill(ids)
    rows = HostRows(matrix)      # the rows this call reads and writes, on the host; in the matrix at the end
    # probabilities only where a tree uses them; greedy accepts a draft iff it is the argmax, which
    # sharpened probabilities estimate better than the temperature-1 ones
    T = (float(temperature) or GREEDY_VALUE_TEMPERATURE) if dynamic else None
    # logits[i] predicts the token after ids[i]: row ids[i] <- its top-k
    warm = slice(None) if warm_from_prompt else slice(-1, None)
    matrix.update(ids[0, warm], logits[warm], T, rows=rows)
    first = sampling.sample(logits[-1:], **settings, **rng.at(0))
    out = [int(first[0])]

    def emitted(toks: list[int], watch: bool = True) -> None:
        """Score new tokens against the drafts the back-off's shadow walks track (before the
        matrix learns from the pass that made them) and add them to the context index.
        watch=False: an unwatched turn (IDLE_WATCH): the tokens only join the index."""
        if chooser is not None:
            chooser.observe_tokens(rows, toks, watch)
        if chains is not None:
            chains.observe(ctx, toks, watch)
        elif ctx is not None:
            ctx.extend(toks)

    emitted(out)
    stop = len(out) >= max_new_tokens or out[-1] == eos_id
    last = first
    # greedy without a mask: one topk per pass gives the draws (its first column: the argmax,
    # the plain loop's token unless tied) and the matrix rows, instead of a sample call and a topk
    fast_greedy = temperature == 0 and allowed_mask is None and matrix.k >= 2
    # sampled plain passes' logits wait here and enter the matrix 16 at a time (one topk instead
    # of 16; idle runs fill the buffer, 32). They are copied into one buffer rather than kept:
    # holding 16 step outputs alive made every step allocate its logits (and the step's
    # temporaries after them) in fresh memory instead of the block the previous step freed
    pend_logits = torch.empty(32, V, dtype=logits.dtype, device=logits.device)
    pend_rows = pend_logits.split(1)     # its rows as [1, V] views, made once: one copy_ per step
    pend_tokens: list[int] = []

    def flush() -> None:
        if pend_tokens:
            matrix.update(pend_tokens, pend_logits[:len(pend_tokens)], T, rows=rows)
            pend_tokens.clear()

    def draw(lg: torch.Tensor, depth: torch.Tensor | None = None):
        """(int64 [n] tokens, the same as a list, the topk or None): one token per row of lg (a
        plain step's, or a tree's nodes at `depth` below the root), each drawn from its
        position's stream."""
        if fast_greedy:
            top = lg.topk(matrix.k, dim=-1)
            v = top.values[:, :2].tolist()
            if all(a > b and a < _INF for a, b in v):   # a unique, finite maximum in every row
                idx = top.indices.tolist()
                return top.indices[:, 0], [r[0] for r in idx], (top, idx)
        tok = sampling.sample(lg, **settings, **rng.at(len(out), depth))
        return tok, tok.tolist(), None

    def learn(tokens: list[int], lg: torch.Tensor, top) -> None:
        """The matrix rows of `tokens` <- the top-k of their logits lg. A greedy draw's topk rows
        are on the host already, and the static tree needs no probabilities: they are written
        as they are (what matrix.update would write, without its ~15 us of tensor handling a
        pass, ~1.5% of greedy decoding on the byte-level bench model)."""
        if top is not None and T is None:
            rows.write(tokens, top[1])
        else:
            matrix.update(tokens, lg, T, top=None if top is None else top[0], rows=rows)

    idle = matrix.idle     # tokens emitted since the chooser last had a hopeful budget (TreeChooser.idle)
    while not stop:
        n = n_chosen = tree_size if chooser is None else chooser.choose()
        if chooser is None or not chooser.idle:
            idle = 0
        cap = context_draft if chains is None else 0
        if chains is not None:
            # the chain alone, or added to the chosen tree: whichever is expected to emit more
            # tokens per unit of time than the back-off's choice
            cap, speed = chains.best(cost_of, 1, 0.0, chooser.speed)
            if n > 1:
                cap2, _ = chains.best(cost_of, n, chooser.expected(n), speed)
                if cap2:
                    cap = cap2
                elif cap:
                    n = 1
        dt = None
        if n > 1 or cap:
            flush()
        t0 = time.perf_counter()    # the pass's own work, without the batched rows of earlier steps
        # chains do not end an idle stretch: one is taken whenever ChainScores.best picks it at a
        # pass boundary, between runs too, and the runs then go on. In sampling from the byte
        # model a 1-token chain holds about half the time and a chain pass now and then is about
        # break-even; ending the stretch on it cost up to 32 tokens of single steps each time
        # (0.934x the plain loop against 0.961x without chains, when a hopeful chain mean did)
        run, long_idle = 0, idle >= IDLE_WATCH
        if idle >= IDLE_AFTER and not cap:
            run = min(IDLE_RUN_LONG if long_idle else IDLE_RUN, max_new_tokens - len(out))
        if run > 1:
            # no budget has been hopeful for `idle` tokens: `run` plain steps back to back, each
            # feeding its sampled token tensor to the next, their tokens read back and walked
            # together (one host read and one tight loop instead of `run` passes of the loop's
            # bookkeeping, which cost ~4% of a step each on the byte-level bench model). Each
            # step draws from its position's stream, so the tokens are the plain loop's; the
            # back-off hears of a winning stretch at most `run` tokens late
            # watched and unwatched by turns, IDLE_RUN_LONG idle tokens each: counted on `idle`,
            # which goes on across calls, so calls shorter than a run take turns too
            unwatched = long_idle and (idle - IDLE_WATCH) // IDLE_RUN_LONG % 2 == 0
            if len(pend_tokens) + run > len(pend_rows):
                flush()
            e, slot, feed = len(out), len(pend_tokens), []
            for j in range(run):
                lg = target.one(last)
                last = sampling.sample(lg, **settings, **rng.at(e + j))
                pend_rows[slot + j].copy_(lg)
                feed.append(last)
            toks = torch.cat(feed).tolist()
            pend_tokens += [out[-1]] + toks[:-1]      # step j's logits predict after the token it fed
            emitted(toks, not unwatched)              # before the matrix learns from these steps
            stats.target_passes += run
            stats.plain_passes += run
            stats.run_steps += run
            if meter is not None and meter.plain(time.perf_counter() - t0, run, IDLE_METER if long_idle else None):
                chooser.set_cost(meter)
            if len(pend_tokens) >= 16 and not long_idle:    # long stretches fill the buffer
                flush()
            out += toks
            idle += run
            stop = len(out) >= max_new_tokens or (eos_id is not None and eos_id in toks)
            continue
        gated = False
        if n > 1:
            if dynamic:
                dt = build_dynamic_tree(matrix, out[-1], n, max_depth, min_value, rows=rows)
                if dt.expected < min_expected:
                    dt, gated = None, True
            else:
                dt = build_tree(matrix, out[-1], tree_template(n, matrix.k, max_depth), rows=rows)
                if chooser is not None and len(dt.parent) == 1:   # every draft unknown: a plain step is cheaper
                    dt = None
        n_tree = 0 if dt is None else len(dt.parent)     # the matrix tree's nodes; a chain's come after
        if cap:
            chain = ctx.chain(cap)
            if chain:
                dt = chain_tree(out[-1], chain) if dt is None else merge_chain(dt, chain)
                stats.chain_passes += 1
        if dt is None:   # a plain one-token step (the same draw as a one-node tree)
            if gated:
                stats.gated_passes += 1
            elif tree_size > 1 or cap:
                stats.plain_passes += 1
            lg = target.one(last)
            stats.target_passes += 1
            last, toks, top = draw(lg)
            t = toks[0]
            emitted(toks)             # before the matrix learns from this step's logits
            if top is not None:
                learn([out[-1]], lg, top)
            else:
                if len(pend_tokens) == len(pend_rows):    # a run filled the buffer
                    flush()
                pend_rows[len(pend_tokens)].copy_(lg)
                pend_tokens.append(out[-1])
            if meter is not None and meter.plain(time.perf_counter() - t0):
                chooser.set_cost(meter)
            if len(pend_tokens) >= 16:
                flush()
            out.append(t)
            idle += 1
            stop = len(out) >= max_new_tokens or t == eos_id
            continue
        n = len(dt.parent)
        logits = target.tree(dt)
        stats.target_passes += 1
        stats.tree_nodes.append(n)
        stats.drafted += n - 1
        _, draws, top = draw(logits, dt.depth.to(device))
        tokens = dt.tokens_list
        before = len(out)
        path, stop = _walk(dt, draws, out, max_new_tokens, eos_id)
        stats.accepted += len(path) - 1
        # the drafts the matrix tree alone would have had accepted: the path's run of its nodes
        by_tree = next((i for i, node in enumerate(path) if node >= n_tree), len(path)) - 1 if n_tree else 0
        stats.chain_accepted += len(path) - 1 - by_tree
        if chooser is not None and n > 1 and n_tree:   # the matrix tree is judged by what it alone accepted
            chooser.tree_ran(n_chosen, by_tree)
        if chooser is not None and chooser.idle:     # a chain pass inside an idle stretch: it goes on
            idle += len(out) - before
        emitted(out[before:])
        learn(tokens, logits, top)
        target.keep(path)
        last = torch.tensor([out[-1]], dtype=torch.long, device=device)
        if meter is not None:
            meter.tree(n, time.perf_counter() - t0)
            chooser.set_cost(meter)
    flush()
    rows.sync()
    if chooser is not None:
        matrix.backoff = chooser.state()
        matrix.idle = idle
    if chains is not None:
        matrix.context = chains.state()
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats


# ---------------------------------------------------------------------------------- draft model
@torch.no_grad()
def draft_model_generate(model, drafter, prompt_ids, *, max_new_tokens: int, num_draft: int = 4,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                         typical_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                         modality_table: torch.Tensor | None = None,
                         allowed_mask: torch.Tensor | None = None, tree: str = "chain", tree_size: int = 16,
                         k: int = 4, max_depth: int = 6) -> tuple[torch.Tensor, SpecStats]:
    """Generate with a smaller mmfm model (same vocabulary) drafting for the target; returns
    (int64 [n] new tokens, SpecStats).

    tree = "chain": num_draft tokens sampled from the drafter per target pass, verified by
    verify_chain. tree = "static" / "dynamic": a tree of deterministic drafts (the drafter's top-k
    tokens at each node) of up to tree_size nodes, verified in one target pass as Token Recycling's
    trees are (_walk); "static" fills the template of tree_template(tree_size, k, max_depth)
    level by level, "dynamic" grows it by DySpec's rule (draft_tree)."""
    _check_common(max_new_tokens, seed)
    if tree not in ("chain", *TREES):
        raise ValueError(f"tree: expected one of chain, {', '.join(TREES)}, got {tree!r}")
    if not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft: expected an int >= 1, got {num_draft!r}")
    V = model.cfg.vocab_size
    if drafter.cfg.vocab_size != V:
        raise ValueError(f"drafter: vocab_size {drafter.cfg.vocab_size} differs from the target's {V}; the drafter "
                         "must share the unified vocabulary")
    settings = sampling_settings(temperature, top_k, top_p, min_p, typical_p, allowed_mask)
    if tree != "chain":
        for name, v, lo in (("tree_size", tree_size, 2), ("k", k, 1), ("max_depth", max_depth, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        return _draft_tree_generate(model, drafter, prompt_ids, settings, max_new_tokens, seed, eos_id,
                                    modality_table, tree, tree_size, k, max_depth)
    greedy = temperature == 0
    device = next(model.parameters()).device
    ids = prompt_tensor(prompt_ids, V, device)
    rng = _Rng(seed)
    stats = SpecStats()
    cap = ids.shape[1] + max_new_tokens + num_draft + 2
    cache = KVCache.for_model(model, batch=1, capacity=cap)
    dcache = KVCache.for_model(drafter, batch=1, capacity=cap)

    def mods(m, x):
        return modality_ids(m, x, modality_table)

    logits = model(ids, modality_ids=mods(model, ids), cache=cache)[0, -1:]
    out = [int(sampling.sample(logits, **settings, **rng.next())[0])]
    out, stop = _finish(out, max_new_tokens, eos_id)
    pending = torch.cat([ids[0], torch.tensor(out, device=device)])[None]   # tokens the drafter has not read
    while not stop:
        G = num_draft
        drafts, qs = [], []
        feed = pending
        for _ in range(G):
            dl = drafter(feed, modality_ids=mods(drafter, feed), cache=dcache)[0, -1:]
            stats.draft_passes += 1
            q = sampling.processed_probs(dl, **settings)
            x = sampling.sample(dl, **settings, **rng.next())
            drafts.append(int(x[0]))
            qs.append(q[0])
            feed = x[None]
        start = int(cache.lengths[0])
        block = torch.tensor([[out[-1]] + drafts], dtype=torch.long, device=device)
        tl = model(block, modality_ids=mods(model, block), cache=cache)[0]        # [G + 1, V]
        stats.target_passes += 1
        stats.drafted += G
        if greedy:
            best = sampling.sample(tl, temperature=0, seed=0, allowed_mask=settings['allowed_mask']).tolist()
            a = next((j for j in range(G) if drafts[j] != best[j]), G)
            nxt = best[a]
        else:
            p = sampling.processed_probs(tl, **settings)
            acc, nx = sampling.verify_chain(p[None], torch.stack(qs)[None],
                                            torch.tensor([drafts], dtype=torch.long, device=device), **rng.next())
            a, nxt = int(acc[0]), int(nx[0])
        stats.accepted += a
        cache.truncate(start + a + 1)            # the root and the accepted drafts
        # the drafter read the root and drafts[:G-1]; keep what was accepted, queue the rest
        dlen = int(dcache.lengths[0]) - (G - 1)   # slots before this round's drafts
        dcache.truncate(dlen + min(a, G - 1))
        pending = torch.tensor([drafts[G - 1:a] + [nxt]], dtype=torch.long, device=device)
        out, stop = _finish(out + drafts[:a] + [nxt], max_new_tokens, eos_id)
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats


class _Nodes:
    """A draft tree under construction: tokens, parents, depths and path values, parents first."""

    def __init__(self, root: int):
        self.tok, self.parent, self.depth, self.value = [root], [-1], [0], [1.0]

    def add(self, parent: int, token: int, value: float) -> int:
        self.tok.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.value.append(value)
        return len(self.tok) - 1

    def tree(self):
        # copies: the tree keeps growing after a drafter pass has read this one
        return tree_from_parents(list(self.tok), list(self.parent), list(self.depth), sum(self.value[1:]))


def draft_tree(drafter_pass, root: int, kind: str, size: int, k: int, max_depth: int, value_probs):
    """Grow a tree of deterministic drafts from the drafter; returns (_Nodes, nodes the drafter
    has evaluated: their keys/values sit in its cache at the tree's slots, the rest were added
    after its last pass).

    drafter_pass(DraftTree) -> the drafter's logits [n, V] for all n nodes (one tree pass; the
    whole tree again every round, as only it knows which nodes see which); value_probs(logits)
    -> the probabilities that rank and value the children. One drafter pass per round, a round
    adding one level:
      static   the template's nodes of the next depth, child of rank r = the parent's r-th most
               likely token (tree_template: wide near the root, deep along rank 0);
      dynamic  DySpec: a node's value is the product of the drafter's probabilities along its
               path (under one-hot drafts, its chance of lying on the accepted path if the
               drafter is right), and the tree grows best-first by value. Children are known
               only after their parent's pass, so a round adds, best first, the candidates worth
               at least `best value added this round * mean top-1 probability`, the most a
               child of this round's nodes is expected to be worth; the rest wait for the next
               round, where those children compete with them."""
    nodes = _Nodes(root)
    template = tree_template(size, k, max_depth) if kind == "static" else None
    t_index = {0: 0}                 # static: template node -> tree node
    heap: list = []                  # dynamic: (-value, tie, parent node, token)
    tie, done, top1 = 0, 0, []
    while True:
        n = len(nodes.tok)
        if n >= size or done == n:
            return nodes, done
        logits = drafter_pass(nodes.tree())
        top = value_probs(logits[done:n]).topk(min(k, logits.shape[-1]), dim=-1)
        vals, toks = top.values.tolist(), top.indices.tolist()
        fresh = range(done, n)
        done = n
        if template is not None:
            d = nodes.depth[n - 1] + 1
            for ti in range(1, len(template)):
                if template.depth[ti] != d or ti in t_index:
                    continue
                par = t_index.get(template.parent[ti])
                if par is None or par < fresh.start:
                    continue
                j = par - fresh.start
                r = template.rank[ti]
                if r < len(toks[j]) and len(nodes.tok) < size:
                    t_index[ti] = nodes.add(par, toks[j][r], 0.0)
            if len(nodes.tok) == n:
                return nodes, done
            continue
        for j, i in enumerate(fresh):
            top1.append(vals[j][0])
            if nodes.depth[i] < max_depth:
                for t, p in zip(toks[j], vals[j]):
                    if p > 0:
                        tie += 1
                        heapq.heappush(heap, (-nodes.value[i] * p, tie, i, t))
        pbar = sum(top1) / len(top1)
        best = None
        while heap and len(nodes.tok) < size and (best is None or -heap[0][0] >= best * pbar):
            neg, _, par, t = heapq.heappop(heap)
            nodes.add(par, t, -neg)
            best = -neg if best is None else best
        if len(nodes.tok) == n:
            return nodes, done


# draft-model trees in greedy decoding: the drafter's probabilities at this temperature value the
# nodes. Unlike the recycled probabilities (the target's own, which sharpened at 0.25 rank its
# argmax well), a small drafter is often wrong about the target's argmax and its temperature-1
# uncertainty says where: on the byte-level bench model, tokens per target pass at 10 / 20 nodes
# were 1.69 / 2.00 at temperature 1 against 1.26 / 1.57 at 0.5, 1.21 / 1.55 at 0.25 and the static
# template's 1.57 / 1.61 (docs/benchmarks.md, ## speculative)
DRAFT_GREEDY_VALUE_TEMPERATURE = 1.0


def _draft_tree_generate(model, drafter, prompt_ids, settings, max_new_tokens, seed, eos_id, modality_table,
                         kind, tree_size, k, max_depth):
    """draft_model_generate with a tree of deterministic drafts (tree = "static" / "dynamic")."""
    V = model.cfg.vocab_size
    device = next(model.parameters()).device
    ids = prompt_tensor(prompt_ids, V, device)
    rng = _Rng(seed)
    stats = SpecStats()
    cap = ids.shape[1] + max_new_tokens + tree_size + 2
    target = _Target(model, KVCache.for_model(model, batch=1, capacity=cap), modality_table)
    draft = _Target(drafter, KVCache.for_model(drafter, batch=1, capacity=cap), modality_table)
    logits = target.prefill(ids)
    draft.prefill(ids)                 # the drafter's cache: every emitted token but the last (the root)
    first = sampling.sample(logits[-1:], **settings, **rng.at(0))
    out = [int(first[0])]
    stop = len(out) >= max_new_tokens or out[-1] == eos_id
    greedy = settings["temperature"] == 0
    # the probabilities the children are ranked and valued by: the sampling distribution (a node's
    # chance of being drawn), in greedy the drafter's at DRAFT_GREEDY_VALUE_TEMPERATURE
    value_settings = dict(settings, temperature=DRAFT_GREEDY_VALUE_TEMPERATURE) if greedy else settings

    def value_probs(lg):
        return sampling.processed_probs(lg, **value_settings)

    def drafter_pass(dt):
        stats.draft_passes += 1
        return draft.tree(dt)

    while not stop:
        nodes, evaluated = draft_tree(drafter_pass, out[-1], kind, tree_size, k, max_depth, value_probs)
        dt = nodes.tree()
        n = len(dt.parent)
        tl = target.tree(dt)
        stats.target_passes += 1
        stats.tree_nodes.append(n)
        stats.drafted += n - 1
        draws = sampling.sample(tl, **settings, **rng.at(len(out), dt.depth.to(device))).tolist()
        path, stop = _walk(dt, draws, out, max_new_tokens, eos_id)
        stats.accepted += len(path) - 1
        target.keep(path)
        # the drafter keeps the accepted nodes it has read; one it has not (added after its last
        # pass: a leaf) is fed as a plain step; the last emitted token is the next root
        seen = [i for i in path if i < evaluated]
        draft.keep(seen)
        for i in path[len(seen):]:
            draft.one(torch.tensor([dt.tokens_list[i]], device=device))
            stats.draft_passes += 1
    if eos_id is not None and eos_id in out:
        out = out[:out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats


def layer_drafter(model, n_layers: int):
    """A smaller mmfm model made of the target's first n_layers blocks, its final norm and head
    (weights shared, not copied): a drafter that needs no training of its own (self-speculation,
    as in LayerSkip / Draft & Verify); how often its drafts are accepted depends on how much the
    later layers change the prediction."""
    import copy

    from mmfm.models import Transformer

    if not isinstance(n_layers, int) or not 1 <= n_layers < model.cfg.n_layers:
        raise ValueError(f"n_layers: expected an int in [1, {model.cfg.n_layers - 1}] (fewer layers than the "
                         f"target's {model.cfg.n_layers}), got {n_layers!r}")
    cfg = copy.copy(model.cfg)
    cfg.n_layers = n_layers
    with torch.device("meta"):
        small = Transformer(cfg)
    small.embed_tokens = model.embed_tokens
    small.layers = torch.nn.ModuleList(model.layers[:n_layers])
    small.norm = model.norm
    small.lm_head = model.lm_head
    small.rotary = model.rotary
    return small.eval()
