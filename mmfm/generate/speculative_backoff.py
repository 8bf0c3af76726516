"""Token Recycling's adaptive back-off: before each pass, a plain one-token step or a draft tree
of some node budget, whichever is expected to emit more tokens per unit of time.

Why not probe with real trees: when trees lose (high-temperature sampling from a weak model),
every probe is a tree pass paid for nothing, and a probe schedule that is rare enough to be cheap
is too slow to notice when trees start winning again. Instead every emitted token, whatever
pass made it, is scored against the tree that *would* have been rooted there ("shadow walks"):
a tree rooted at position i accepts exactly the longest run of the following emitted tokens
that lies on one of its paths. That is not only an estimate of the same quantity - it has the
same distribution: the real tree's walk draws, at each node it reaches, one token from the
target's distribution after that node's prefix, which is how the plain sequence's next token is
drawn too. So a running mean of the shadow walks' accepted drafts is the expected accepted
drafts per tree pass, at no model cost, in plain stretches as in tree stretches.

One walk along the static template of tree_size nodes scores every smaller budget as well: the
template of n nodes is the first n nodes that best-first growth added (TreeTemplate.order), and
a node is always added after its parent, so a path's accepted drafts under budget n are the path
nodes of order < n (a bisection). The chooser keeps one running mean per candidate budget and
picks the budget of highest (1 + expected accepted drafts) / cost, where a pass's cost, in plain
steps, is 1 + pass_cost + node_cost * (n - 1); unless that beats a plain step's 1 token per step
by a margin (10%), the pass is a plain DenseStep step. So a losing tree first shrinks, then stops; a winning one grows back.

The expected drafts a budget is judged by are a lower confidence bound, the running mean less z
(0.5) standard errors of it (from a running mean of the squared walks: the variance of an
exponential mean of independent draws is var * alpha / (2 - alpha)), not the mean itself. The
running mean is a noisy estimate and the choice picks whichever budget it overrates most: in
sampling from a model whose drafts rarely hold (walks of 0 with a rare 1 or 2), two lucky walks in
a row lifted a small budget's mean past break-even and bought a tree pass that then accepted its
usual ~0.1 drafts (docs/benchmarks.md, ## speculative: 21-40 such passes of ~375). Greedy walks on
repetitive text are long and alike, so their bound stays close to their mean. z = 0.5 was picked
on the byte-level bench model among 0 / 0.5 / 1: sampling's tree passes 42 / 15 / 14 of ~384,
greedy's tokens per second unchanged at 0.5 and ~5% lower at 1 (trees return later after a miss).

A fixed TreeCost is right for one model on one machine only: on a byte-level model whose plain
step takes 0.78 ms, the tree pass's fixed host work (building the tree and its mask, the walk,
the matrix update, the cache compaction) is a far larger share than on the demo export the
defaults were measured on, and trees that accept 0.6 drafts per pass - a win by the defaults -
lost 8-12% (docs/benchmarks.md, ## speculative). So by default (MeasuredCost) the loop times
every pass and refits pass_cost (and node_cost, once passes of several sizes run) from what tree
passes really cost against plain steps; a losing tree is then seen as such after the few passes
it takes the estimate to move. Timing makes which
passes run differ from run to run, which would make seeded runs differ too if draws were keyed by
call; they are keyed by position (speculative._Rng.at), so the tokens are the plain loop's
whatever passes ran.

Where the walks underrate trees: a tree pass recycles the top-k of every node into the matrix, a
plain step that of one token, so while trees run the matrix holds candidates that plain stretches
never fill, and walks scored in plain stretches see fewer drafts than trees would get (greedy on
the long export: a tree every pass accepted 2.1 drafts, 3.07 tokens per pass, where the back-off
ran trees at 1.6 tokens per pass). So right after a tree pass its budget is also judged by what
the trees of the current streak really accepted (TreeChooser.tree_ran: a running mean, weight 0.5);
the streak ends with the first pass that is not a tree. In sampling from a weak model trees accept
little, and their streaks end at once.

The walks read the matrix rows *before* the pass that emitted the tokens updates them (a row
refreshed from the very position being scored would make every greedy draft match). Which pass
runs depends only on tokens already emitted and on measured times, neither of which depends on
the draws still to come, so the output stays distributed exactly as plain sampling
(tests/test_speculative.py).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import torch

from mmfm.generate.recycling import tree_template

BUDGETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)   # candidate node budgets (the full tree_size is added)


@dataclass
class TreeCost:
    """A tree pass of n nodes costs 1 + pass_cost + node_cost * (n - 1) plain decode steps.

    The defaults were measured on the demo export (dim 128, 4 layers, vocabulary 3784) on a CPU,
    through the whole Token Recycling loop against plain DenseStep steps (building the tree,
    the additive mask, sampling every node, the matrix update, the cache compaction): a 1-node
    tree cost 1.15-1.29 steps, a 20-node one 1.6-2.1 (docs/benchmarks.md, ## speculative). On a
    GPU a tree pass of tens of nodes costs about one step: pass_cost and node_cost near 0 there."""
    pass_cost: float = 0.2
    node_cost: float = 0.03

    def __post_init__(self):
        for name in ("pass_cost", "node_cost"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")

    def __call__(self, n: int) -> float:
        return 1.0 + self.pass_cost + self.node_cost * (n - 1)


def default_cost(device) -> TreeCost:
    """The prior tree cost when the caller gives none, by device type.

    On a CPU, DenseStep.tree with n nodes costs about 1 + 0.065 (n - 1) plain steps on the
    byte-level bench model and 1 + 0.1 (n - 1) on the long export (decode_linear reads each
    weight once for up to 12 rows, then the matmuls grow with n; docs/benchmarks.md, ##
    speculative, session 10); the loop adds per tree pass the tree's build, the draws of every
    node, the walk, the matrix update and the cache compaction, which MeasuredCost measured at
    0.3-0.7 steps. So the CPU prior is pass_cost 0.4, node_cost 0.08: against the earlier 0.7 and
    0.03 (fitted when a tree-cost measurement had timed 20 nodes at every n), greedy Token
    Recycling went from 1.33x to 1.48x the decode loop on the byte model and from 1.09x to 1.17x on
    the long export, with sampling unchanged. Elsewhere (a GPU, where a tree pass of tens of
    nodes should cost about one step, not yet measured here) TreeCost()."""
    return TreeCost(pass_cost=0.4, node_cost=0.08) if torch.device(device).type == "cpu" else TreeCost()


class MeasuredCost:
    """A TreeCost refitted from wall times: pass_cost and node_cost follow what tree passes
    measure against plain steps.

    plain(seconds) after each plain step, tree(n, seconds) after each tree pass of n nodes, each
    timing the whole pass (the model step, the draws, the walk, the matrix update; not the
    batched update of earlier plain steps' rows). Plain steps are taken 8 at a time (their
    mean enters a running mean, alpha; plain() says when the estimate changed), so a plain step
    pays two clock reads and an add, not the refit.

    Each tree pass is one point (n - 1, seconds / plain time - 1) of the line pass_cost +
    node_cost * (n - 1), and the two are a weighted least-squares fit over the points, each
    older point weighing 1 - alpha less. The prior enters as points too, on its own line at 0
    and PRIOR_NODES extra nodes, of total weight 1 / alpha, so the first pass moves the fit
    alpha of the way and the prior fades as passes come. While the passes are of one size - a
    run's trees often are - the data fix only the line's height there, and the slope stays the
    prior's (a small ridge toward it): pass_cost is then the running mean, weight alpha, of
    each pass's seconds / plain time - 1 - node_cost * (n - 1), the single-parameter estimate
    this was before. Once passes of several sizes run (trees of a few budgets, context chains of
    1-16 nodes; docs/speculative.md) the slope is measured too: the prior's 0.08 per node on
    a CPU was measured with wide trees on the byte model, and chains cost more per node there.
    A single slow pass (a page fault, another process) is clipped to 2 + 2x the current
    estimate of its cost above a plain step, so one outlier cannot switch trees off for good;
    and while no tree runs the fit relaxes toward the prior by `relax` per plain step (a tree
    judged by a stale, too-high cost would otherwise never be measured again: with relax =
    0.01, a model whose trees lose is re-probed about once per hundred plain steps). Learning
    faster (the first pass moving the estimate half way) and relaxing 5x slower were tried:
    fewer losing trees in sampling but no faster there, and 3-5% slower greedy decoding on the
    long export, whose extra trees pay (docs/benchmarks.md, ## speculative, session 9)."""

    BATCH = 8    # plain steps per update of the plain step time
    PRIOR_NODES = 8
    RIDGE = 0.05   # the slope's pull toward the prior's, in passes at PRIOR_NODES (conditioning)

    def __init__(self, prior: TreeCost | None = None, alpha: float = 0.2, relax: float = 0.01):
        self.prior = prior or TreeCost()
        self.alpha, self.relax = alpha, relax
        self._n, self._s = 0, 0.0
        self.pass_cost = self.prior.pass_cost
        self.node_cost = self.prior.node_cost
        # the fit's sums (weight, x, y, xx, xy) over the passes and the prior's points
        self._prior_sums = self._line_sums(self.prior.pass_cost, self.prior.node_cost, 1.0 / alpha)
        self._sums = list(self._prior_sums)
        self.step_s: float | None = None     # running mean of a plain step's seconds
        self.tree_passes = 0                 # tree passes measured

    def _line_sums(self, a: float, b: float, weight: float) -> list[float]:
        """The sums of two points of the line a + b x, at 0 and PRIOR_NODES, weight/2 each."""
        X, h = float(self.PRIOR_NODES), weight / 2.0
        y1 = a + b * X
        return [weight, h * X, h * (a + y1), h * X * X, h * X * y1]

    def __call__(self, n: int) -> float:
        return 1.0 + self.pass_cost + self.node_cost * (n - 1)

    def plain(self, seconds: float, steps: int = 1, batch: int | None = None) -> bool:
        """The seconds of `steps` plain steps run back to back; True when the estimate changed
        (every `batch` steps or more, default BATCH). The decode loop's idle runs pass a larger
        batch: while no tree is in sight a refit every 8 steps, and the back-off's re-judging of
        every budget that follows it, costs ~1% of a step on the byte-level bench model, and the
        relaxation toward the prior compounds the same either way."""
        self._n += steps
        self._s += seconds
        if self._n < (batch or self.BATCH):
            return False
        n, mean, self._n, self._s = self._n, self._s / self._n, 0, 0.0
        if self.step_s is None:
            self.step_s = mean
        else:
            self.step_s += self.alpha * (min(mean, 3.0 * self.step_s) - self.step_s)
        g = (1.0 - self.relax) ** n
        self._sums = [p + g * (v - p) for v, p in zip(self._sums, self._prior_sums)]
        self._refit()
        return True

    def tree(self, n: int, seconds: float) -> None:
        if self.step_s is None:     # nothing to compare with yet
            return
        x = float(n - 1)
        y = seconds / self.step_s - 1.0
        y = min(max(y, 0.0), self.node_cost * x + 2.0 + 2.0 * self.pass_cost)
        f = 1.0 - self.alpha
        w, sx, sy, sxx, sxy = self._sums
        self._sums = [w * f + 1.0, sx * f + x, sy * f + y, sxx * f + x * x, sxy * f + x * y]
        self._refit()
        self.tree_passes += 1

    def _refit(self) -> None:
        """Weighted least squares of y = pass_cost + node_cost * x, the slope ridged toward the prior's."""
        w, sx, sy, sxx, sxy = self._sums
        lam = self.RIDGE * self.PRIOR_NODES ** 2
        b0 = self.prior.node_cost
        # normal equations: [[w, sx], [sx, sxx + lam]] @ [a, b] = [sy, sxy + lam b0]
        det = w * (sxx + lam) - sx * sx
        b = (w * (sxy + lam * b0) - sx * sy) / det
        if b < 0.0:     # a falling line would make big trees look free: keep it flat
            b = 0.0
        self.node_cost = b
        self.pass_cost = max((sy - b * sx) / w, 0.0)


class TreeChooser:
    """choose() -> node budget of the next pass (1 = a plain step); observe(table, token) after
    each emitted token, before the matrix learns from the pass that emitted it.

    alpha: weight of the newest walk in the running means (0.3: a run of losing walks brings the
    most optimistic state, every budget's mean at max_depth, under any break-even in ~8 walks;
    one walk closes per emitted token). state: the running means of an earlier call (hot start;
    kept on the RecyclingMatrix: {budget: (mean, mean of squares)}, or {budget: mean}, read as a
    mean of identical walks), used when it was made for the same budgets. z: standard errors
    below the running mean at which a budget is judged (0: the mean itself; 0.5 by default)."""

    def __init__(self, tree_size: int, k: int, max_depth: int, cost, alpha: float = 0.3,
                 state: dict | None = None, last_token: int | None = None, margin: float = 0.1,
                 z: float = 0.5):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: expected a number in (0, 1], got {alpha!r}")
        if not isinstance(z, (int, float)) or not z >= 0:
            raise ValueError(f"z: expected a number >= 0, got {z!r}")
        self.template = tree_template(tree_size, k, max_depth)
        self.child, self.order = self.template.child, self.template.order
        size = len(self.template)    # fewer than tree_size when k ** depth is smaller
        self.sizes = [n for n in BUDGETS if n < size] + [size]
        self.set_cost(cost)
        self.alpha = alpha
        self.margin = margin
        self.z, self.se_scale = float(z), (alpha / (2.0 - alpha)) ** 0.5
        self._ema = {n: 0.0 for n in self.sizes}
        self._sq = {n: 0.0 for n in self.sizes}      # running mean of the squared walks
        # walks closed with nothing accepted and not yet applied: each multiplies every mean by
        # 1 - alpha. In sampling from a model whose drafts rarely hold that is nearly every
        # token, and one counter increment is the whole bookkeeping of such a token
        self._decays = 0
        # choose() answers 1 without looking while no budget's mean can win: means only fall
        # until a walk accepts something, and the cost only changes through set_cost
        self._plain = False
        self._streak = None          # the budget of the tree just run (tree_ran), until choose() reads it
        self._streak_mean = None     # running mean of the accepted drafts of the current streak's trees
        self.speed = 1.0 + margin    # tokens per plain step the last choose() expects of its choice (plain: 1 + margin)
        if state and sorted(state) == self.sizes:
            for n, v in state.items():
                m, q = (v, v * v) if isinstance(v, (int, float)) else v
                self._ema[n], self._sq[n] = float(m), float(q)
        self.walks: list[tuple[int, list[int]]] = []     # open walks: (template node, orders along the path)
        self.last = last_token
        if last_token is not None:
            self.walks.append((0, []))

    def _means(name: str, doc: str):
        """A running-means dict read with the pending empty walks applied; assigning one (tests, a
        hot start) also drops the cached plain answer."""
        def get(self):
            self._settle()
            return getattr(self, name)

        def put(self, value: dict) -> None:
            self._settle()
            setattr(self, name, dict(value))
            self._plain = False
        return property(get, put, doc=doc)

    ema = _means("_ema", "{budget: running mean of the accepted drafts of its walks}")
    sq = _means("_sq", "{budget: running mean of the squared accepted drafts}")
    del _means

    def _settle(self) -> None:
        """Apply the pending empty walks to the means."""
        if self._decays:
            f = (1.0 - self.alpha) ** self._decays
            self._decays = 0
            for n in self.sizes:
                self._ema[n] *= f
                self._sq[n] *= f

    def set_cost(self, cost) -> None:
        """cost: n -> a tree pass of n nodes in plain steps (a TreeCost or a MeasuredCost); read
        again after each measured pass."""
        self.cost = [cost(n) for n in self.sizes]
        self._plain = False

    def choose(self) -> int:
        """The budget of highest expected tokens per cost; 1 (a plain step) unless that beats a
        plain step by `margin` (0.1): the cost model is a fixed estimate and the running mean a
        noisy one, and a marginal tree risks more than it can gain. Right after a tree pass its
        budget is also judged by what the trees of the current streak accepted (tree_ran())."""
        streak, self._streak = self._streak, None
        if streak is None:
            self._streak_mean = None          # a streak runs through consecutive trees only
            if self._plain:
                self.speed = 1.0 + self.margin
                return 1
        self._settle()
        best, speed, ema, hopeful = 1, 1.0 + self.margin, self._ema, False
        if streak is not None:      # the trees just run, judged by what they really accepted
            s = (1.0 + self._streak_mean) / self.cost[self.sizes.index(streak)]
            if s > speed:
                best, speed = streak, s
        for n, c in zip(self.sizes, self.cost):
            if (1.0 + ema[n]) / c <= speed:   # not even the mean wins: no need for the bound
                continue
            hopeful = True
            s = (1.0 + self.expected(n)) / c
            if s > speed:
                best, speed = n, s
        self._plain = not hopeful
        self.speed = speed
        return best

    @property
    def idle(self) -> bool:
        """True while choose() answers 1 without looking: no budget's running mean can win
        (they only fall until a walk accepts a draft) and no tree streak is open."""
        return self._plain and self._streak is None

    def tree_ran(self, n: int, accepted: int) -> None:
        """After a tree pass of the budget n that choose() returned: the drafts it accepted.

        The next choose() may run budget n again on the evidence of the trees just run (a
        running mean over the streak, weight 0.5 for the newest), not only on the walks': a tree
        pass recycles the top-k of every node into the matrix where a plain step recycles one
        row, so while trees run the matrix holds candidates that plain stretches never fill, and
        the walks scored in plain stretches underrate the trees (greedy on the long export: a
        tree every pass accepted 2.1 drafts where the walks of plain stretches expected well
        under 1). The streak ends with the first pass that is not a tree, and a tree that
        accepts little halves its mean, so a streak cannot outlive its trees' worth."""
        prev = self._streak_mean
        self._streak_mean = float(accepted) if prev is None else prev + 0.5 * (accepted - prev)
        self._streak = n

    def expected(self, n: int) -> float:
        """The lower bound on budget n's accepted drafts per pass that choose() judges it by."""
        self._settle()
        m = self._ema[n]
        return m - self.z * self.se_scale * max(self._sq[n] - m * m, 0.0) ** 0.5

    def observe(self, table, token: int) -> None:
        """observe_tokens(table, [token])."""
        self.observe_tokens(table, [token])

    def observe_tokens(self, table, tokens: list[int], watch: bool = True) -> None:
        """Emitted `tokens`, in order. table: the matrix's candidate rows as they were when the
        pass that emitted them was chosen: a callable t -> list of k ints (recycling.HostRows,
        what the loop passes: no tensor read per token) or the int [V, k] table itself. One
        call per pass, one loop: this runs for every emitted token, sampling included.

        watch=False: the tokens are skipped. The open walks are dropped uncounted and none opens
        until the next watched call (long idle stretches watch every other run,
        token_recycling_generate's IDLE_WATCH). Dropping keeps the means what they are when
        every token is watched: at any moment those leave out the walks still open, which are
        the long ones. Following the open walks through the skipped tokens instead would add
        exactly those, and put the means 14-24% high in simulation (tests/test_speculative.py)."""
        if not watch:
            self.walks = []
            self.last = tokens[-1] if tokens else self.last
            return
        row_of = table if callable(table) else (lambda t: table[t].tolist())
        child, order, close = self.child, self.order, self._close
        walks, last = self.walks, self.last
        for token in tokens:
            prev, last = last, token
            if prev is None or not walks:
                walks.append((0, []))
                continue
            row = row_of(prev)
            if token not in row:           # no walk goes on: all close here
                if len(walks) == 1 and not walks[0][1]:
                    # only the walk rooted at prev, empty: it closes with nothing accepted and
                    # the walk rooted at token is the same empty one (sampling's usual token)
                    self._decays += 1
                    continue
                for _, orders in walks:
                    close(orders)
                walks = [(0, [])]
                continue
            r = row.index(token)
            still = []
            for node, orders in walks:
                c = child.get((node, r))
                if c is None:
                    close(orders)
                else:
                    orders.append(order[c])
                    still.append((c, orders))
            walks = still
            walks.append((0, []))
        self.walks, self.last = walks, last

    def _close(self, orders: list[int]) -> None:
        if not orders:                      # nothing accepted (most walks in plain stretches)
            self._decays += 1
            return
        self._settle()
        self._plain = False
        a, ema, sq = self.alpha, self._ema, self._sq
        for n in self.sizes:
            x = bisect_left(orders, n)
            ema[n] += a * (x - ema[n])
            sq[n] += a * (x * x - sq[n])

    def state(self) -> dict[int, tuple[float, float]]:
        """{budget: (running mean, running mean of squares)}: the hot start of the next call."""
        self._settle()
        return {n: (self._ema[n], self._sq[n]) for n in self.sizes}
