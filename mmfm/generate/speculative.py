"""Lossless speculative decoding: Token Recycling (draft trees from recycled candidates) and a
draft-model mode (a smaller mmfm model drafts a chain).

Both emit tokens distributed exactly as plain sampling from the target under the same settings
(temperature, top_k, top_p, min_p, typical_p; the distribution of mmfm.ops.sampling.processed_probs),
and with temperature 0 exactly the plain greedy tokens:

  * Token Recycling drafts are deterministic, so a node's children x_1..x_K (distinct tokens) are
    K drafts with one-hot draft distributions; verify_multi_draft's recursive rejection sampling
    with per-draft q_i = onehot(x_i) accepts x_i with probability r_i(x_i) and otherwise removes
    x_i from the residual, so the token it returns is distributed as p. Descending into the
    accepted child and repeating is sequential sampling along the tree.
  * Draft-model drafts are sampled from the drafter's processed distribution q and verified with
    verify_chain (accept with min(1, p/q), residual norm(max(0, p - q))).

Batch size 1 (a prompt is one sequence). Stats report the acceptance length (tokens emitted per
target verification pass) so speed-ups can be read off independently of timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmfm.generate.recycling import RecyclingMatrix, build_tree, tree_template
from mmfm.generate.decode import modality_ids
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
    plain_passes: int = 0        # recycling passes run without drafts (adaptive back-off)

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
                "plain_passes": self.plain_passes}


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


class _Rng:
    """(seed, offset) pairs for the sampling ops: one fresh offset per random call."""

    def __init__(self, seed: int | None):
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self.offset = 0

    def next(self) -> dict:
        self.offset += 1
        return {"seed": self.seed, "offset": self.offset}


def _finish(out: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Cut at max_new_tokens and after the first eos; (tokens, stop)."""
    if eos_id is not None and eos_id in out:
        return out[:min(out.index(eos_id) + 1, max_new_tokens)], True
    return out[:max_new_tokens], len(out) >= max_new_tokens


# ------------------------------------------------------------------------------ Token Recycling
@torch.no_grad()
def token_recycling_generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, min_p: float = 0.0, typical_p: float = 1.0, seed: int | None = None,
                             eos_id: int | None = None, matrix: RecyclingMatrix | None = None, tree_size: int = 40,
                             k: int = 8, max_depth: int = 8, warm_from_prompt: bool = True,
                             modality_table: torch.Tensor | None = None,
                             allowed_mask: torch.Tensor | None = None, min_accepted: float = 1.0,
                             backoff: int = 8) -> tuple[torch.Tensor, SpecStats]:
    """Generate up to max_new_tokens after prompt_ids with Token Recycling; returns (int64 [n]
    new tokens, SpecStats). `matrix` (a RecyclingMatrix) is updated in place, so passing the same
    one across calls keeps its candidates (the paper's hot start); warm_from_prompt also fills it
    from the prefill's logits. tree_size / k / max_depth shape the static draft tree.

    Adaptive back-off: a tree pass costs more than a one-token pass (about 2x for a small model on
    a CPU), so when the running mean of accepted drafts per tree pass falls below min_accepted,
    the next `backoff` passes feed the last token alone (a plain step; the matrix still learns
    from its logits) before a tree is tried again. Which draft is offered never changes the output
    distribution (it depends only on the past), so this stays lossless. min_accepted=0 disables it."""
    _check_common(max_new_tokens, seed)
    settings = sampling_settings(temperature, top_k, top_p, min_p, typical_p, allowed_mask)
    greedy = temperature == 0
    V = model.cfg.vocab_size
    device = next(model.parameters()).device
    ids = prompt_tensor(prompt_ids, V, device)
    if matrix is None:
        matrix = RecyclingMatrix(V, k, device="cpu")
    elif matrix.vocab_size != V:
        raise ValueError(f"matrix: built for vocab_size={matrix.vocab_size}, the model has {V}")
    template = tree_template(tree_size, matrix.k, max_depth)
    if not isinstance(backoff, int) or backoff < 0:
        raise ValueError(f"backoff: expected an int >= 0, got {backoff!r}")
    if not min_accepted >= 0:
        raise ValueError(f"min_accepted: expected a number >= 0, got {min_accepted!r}")
    accepted_ema, skip = None, 0   # running mean of accepted drafts per tree pass; plain passes left
    rng = _Rng(seed)
    stats = SpecStats()
    cache = KVCache.for_model(model, batch=1, capacity=ids.shape[1] + max_new_tokens + len(template) + 1)
    logits = model(ids, modality_ids=modality_ids(model, ids, modality_table), cache=cache)[0]
    if warm_from_prompt:
        matrix.update(ids[0, 1:], logits[:-1])   # logits[i] predicts the token after ids[i]
    matrix.update(ids[0, -1:], logits[-1:])
    out = [int(sampling.sample(logits[-1:], **settings, **rng.next())[0])]
    out, stop = _finish(out, max_new_tokens, eos_id)
    while not stop:
        if skip > 0:   # back-off: a plain one-token step (the same draw as a one-node tree)
            skip -= 1
            last = torch.tensor([[out[-1]]], dtype=torch.long, device=device)
            lg = model(last, modality_ids=modality_ids(model, last, modality_table), cache=cache)[0]
            stats.target_passes += 1
            stats.plain_passes += 1
            matrix.update(last[0], lg)
            if greedy:
                nxt = sampling.sample(lg, temperature=0, seed=0, allowed_mask=settings["allowed_mask"])
            else:
                nxt = sampling.sample(lg, **settings, **rng.next())
            out, stop = _finish(out + [int(nxt[0])], max_new_tokens, eos_id)
            continue
        tree = build_tree(matrix, out[-1], template)
        start = int(cache.lengths[0])
        node_ids = tree.tokens.to(device)[None]
        logits = model(node_ids, modality_ids=modality_ids(model, node_ids, modality_table),
                       attn_mask=tree.mask.to(device)[None], positions=start + tree.depth.to(device)[None],
                       cache=cache)[0]
        stats.target_passes += 1
        stats.tree_nodes.append(len(tree.parent))
        stats.drafted += len(tree.parent) - 1
        path, emitted = _walk_tree(tree, logits, settings, greedy, rng)
        stats.accepted += len(path) - 1
        if len(tree.parent) > 1 and min_accepted > 0:
            a = float(len(path) - 1)
            accepted_ema = a if accepted_ema is None else 0.7 * accepted_ema + 0.3 * a
            if accepted_ema < min_accepted:
                skip, accepted_ema = backoff, None   # the next probe starts a fresh mean
        matrix.update(tree.tokens, logits)
        cache.keep(0, start, torch.tensor(path))
        out, stop = _finish(out + emitted, max_new_tokens, eos_id)
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats


def _walk_tree(tree, logits: torch.Tensor, settings: dict, greedy: bool, rng: _Rng) -> tuple[list[int], list[int]]:
    """Verify the tree from the root: (accepted node path starting at the root, emitted tokens =
    the accepted drafts then the target's own next token)."""
    tokens = tree.tokens.tolist()
    if greedy:   # the same op and tie rule as plain greedy decoding, for every node at once
        best = sampling.sample(logits, temperature=0, seed=0, allowed_mask=settings['allowed_mask']).tolist()
    else:
        probs = sampling.processed_probs(logits, **settings)
    cur, path, emitted = 0, [0], []
    while True:
        kids = tree.children[cur]
        if greedy:
            t = best[cur]
            hit = next((c for c in kids if tokens[c] == t), -1)
        elif not kids:
            t, hit = int(sampling.sample(logits[cur:cur + 1], **settings, **rng.next())[0]), -1
        else:
            cand = torch.tensor([[tokens[c] for c in kids]], dtype=torch.long, device=logits.device)
            onehot = torch.zeros(1, len(kids), logits.shape[-1], dtype=probs.dtype, device=logits.device)
            onehot.scatter_(2, cand[:, :, None], 1.0)
            tok, idx = sampling.verify_multi_draft(probs[cur:cur + 1], onehot, cand, replacement=True, **rng.next())
            t, i = int(tok[0]), int(idx[0])
            hit = kids[i] if i >= 0 else -1
        emitted.append(t)
        if hit < 0:
            return path, emitted
        path.append(hit)
        cur = hit


# ---------------------------------------------------------------------------------- draft model
@torch.no_grad()
def draft_model_generate(model, drafter, prompt_ids, *, max_new_tokens: int, num_draft: int = 4,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                         typical_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                         modality_table: torch.Tensor | None = None,
                             allowed_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Generate with a smaller mmfm model (same vocabulary) drafting num_draft tokens per target
    pass, verified by verify_chain; returns (int64 [n] new tokens, SpecStats)."""
    _check_common(max_new_tokens, seed)
    if not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft: expected an int >= 1, got {num_draft!r}")
    V = model.cfg.vocab_size
    if drafter.cfg.vocab_size != V:
        raise ValueError(f"drafter: vocab_size {drafter.cfg.vocab_size} differs from the target's {V}; the drafter "
                         "must share the unified vocabulary")
    settings = sampling_settings(temperature, top_k, top_p, min_p, typical_p, allowed_mask)
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
