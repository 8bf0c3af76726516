"""Objectives (see the package docstring) and the shared loss with its per-modality report."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmfm.registry import Registry

IGNORE = -100
# Every objective shares ObjectiveConfig; its `kind` field names the class.
OBJECTIVES = Registry("objective", field="kind", default="ar", modules=("mmfm.objectives",))


@dataclass
class ObjectiveConfig:
    kind: str = "ar"                  # ar, masked, hybrid: a name in OBJECTIVES
    # ar: each packed sample (from its <bos>) attends only to itself, as it will at generation, where
    # a prompt has no earlier samples before it (without it, a caption can lean on a previous sample's)
    document_mask: bool = False
    # per-modality loss weights by name (text, image, ...; 'special' for <eos> and markers); 1.0 if absent
    loss_weights: dict[str, float] = field(default_factory=dict)
    # modalities whose tokens get no loss (e.g. [special]); names as in the vocabulary
    no_loss: list[str] = field(default_factory=list)
    # masked (4M): Dirichlet concentration, and input / target budgets as fractions of the valid tokens
    dirichlet_alpha: float = 1.0
    input_fraction: float = 0.5
    target_fraction: float = 0.25
    # hybrid (BAMM): the masked suffix starts at a uniform point in [min_prefix, 1) of the length,
    # and this share of the suffix is replaced by <mask> and predicted
    min_prefix: float = 0.25
    mask_ratio: float = 0.5

    def validate(self, names: list[str]) -> None:
        OBJECTIVES.get(self.kind)   # "kind: unknown objective ...; expected one of: ..."
        for k, v in self.loss_weights.items():
            if k not in names:
                raise ValueError(f"loss_weights.{k}: unknown modality; the vocabulary has {', '.join(names)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"loss_weights.{k}: expected a number >= 0, got {v!r}")
        for k in self.no_loss:
            if k not in names:
                raise ValueError(f"no_loss: unknown modality {k!r}; the vocabulary has {', '.join(names)}")
        for f in ("input_fraction", "target_fraction", "min_prefix", "mask_ratio"):
            if not 0.0 < getattr(self, f) <= 1.0:
                raise ValueError(f"{f}: must be in (0, 1], got {getattr(self, f)}")
        if self.input_fraction + self.target_fraction > 1.0:
            raise ValueError("target_fraction: input_fraction + target_fraction must be <= 1")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha: must be > 0, got {self.dirichlet_alpha}")


@dataclass
class Prepared:
    input_ids: torch.Tensor
    modality_ids: torch.Tensor
    labels: torch.Tensor
    label_mod: torch.Tensor
    attn_mask: torch.Tensor | None


class Objective:
    def __init__(self, cfg: ObjectiveConfig, vocab):
        cfg.validate(vocab.modality_names)
        self.cfg, self.vocab = cfg, vocab
        self.names = vocab.modality_names
        w = torch.ones(len(self.names))
        for k, v in cfg.loss_weights.items():
            w[self.names.index(k)] = float(v)
        for k in cfg.no_loss:
            w[self.names.index(k)] = 0.0
        self.weights = w
        self.mask_id = vocab.mask_id

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        raise NotImplementedError


@OBJECTIVES.register("ar", ObjectiveConfig)
class AR(Objective):
    """Next-token prediction: position t predicts ids[t + 1]; padding and no_loss modalities get none."""

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], IGNORE)
        label_mod = torch.zeros_like(ids)
        label_mod[:, :-1] = modality_ids[:, 1:]
        mask = None
        if self.cfg.document_mask:
            doc = (ids == self.vocab.bos_id).long().cumsum(1)                # [B, L]: which sample
            L = ids.shape[1]
            mask = torch.ones(L, L, dtype=torch.bool).tril()[None] & (doc[:, :, None] == doc[:, None, :])
        return Prepared(ids, modality_ids, labels, label_mod, mask)


@OBJECTIVES.register("masked", ObjectiveConfig)
class Masked(Objective):
    """4M-style masked modelling in a decoder with bidirectional attention. Per sequence, the input
    budget (input_fraction of its valid tokens) and the target budget (target_fraction) are each
    split over the modalities present with proportions drawn from Dirichlet(alpha); within a
    modality, inputs and targets are disjoint random tokens (a modality with fewer tokens than its
    share gives what it has). Inputs are seen; every other position reads <mask>; targets are
    predicted at their own position. Attention is full over valid tokens."""

    def _split(self, budget: int, counts: torch.Tensor, g) -> torch.Tensor:
        present = counts > 0
        alpha = torch.full((int(present.sum()),), self.cfg.dirichlet_alpha)
        # Dirichlet via normalised Gamma draws from the torch generator (reproducible and resumable)
        gam = torch._standard_gamma(alpha) if g is None else _gamma(alpha, g)
        p = torch.zeros(len(counts))
        p[present] = gam / gam.sum()
        return torch.minimum((p * budget).round().long(), counts)

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        B, L = ids.shape
        G = len(self.names)
        inp = torch.zeros(B, L, dtype=torch.bool)
        tgt = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            n = int(valid[b].sum())
            counts = torch.bincount(modality_ids[b][valid[b]], minlength=G)
            n_in = self._split(max(1, int(self.cfg.input_fraction * n)), counts, generator)
            n_tg = self._split(max(1, int(self.cfg.target_fraction * n)), counts, generator)
            for m in range(G):
                pos = torch.nonzero(valid[b] & (modality_ids[b] == m)).flatten()
                if not len(pos):
                    continue
                perm = pos[torch.randperm(len(pos), generator=generator)]
                k_in = int(n_in[m])
                k_tg = min(int(n_tg[m]), len(pos) - k_in)
                inp[b, perm[:k_in]] = True
                tgt[b, perm[k_in:k_in + k_tg]] = True
        input_ids = torch.where(inp, ids, torch.full_like(ids, self.mask_id))
        labels = torch.where(tgt, ids, IGNORE)
        attn = (valid[:, None, :] & valid[:, :, None]) | torch.eye(L, dtype=torch.bool)[None]
        return Prepared(input_ids, modality_ids, labels, modality_ids.clone(), attn)


@OBJECTIVES.register("hybrid", ObjectiveConfig)
class Hybrid(Objective):
    """BAMM-style hybrid: positions [0, s) are autoregressive (causal, predict the next token);
    positions [s, L) are a masked block: mask_ratio of them read <mask> and predict themselves, they
    attend to the whole prefix and bidirectionally to each other. s is drawn per sequence."""

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        B, L = ids.shape
        u = torch.rand(B, generator=generator)
        n_valid = valid.sum(1)
        s = (n_valid.float() * (self.cfg.min_prefix + (1 - self.cfg.min_prefix) * u)).long().clamp(1, L - 1)
        pos = torch.arange(L)
        suffix = pos[None, :] >= s[:, None]                                        # [B, L]
        masked = suffix & valid & (torch.rand(B, L, generator=generator) < self.cfg.mask_ratio)
        input_ids = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        labels = torch.full_like(ids, IGNORE)
        nxt_ok = valid[:, 1:] & ~suffix[:, 1:] & ~suffix[:, :-1]
        labels[:, :-1] = torch.where(nxt_ok, ids[:, 1:], IGNORE)
        labels = torch.where(masked, ids, labels)
        label_mod = torch.zeros_like(ids)
        label_mod[:, :-1] = modality_ids[:, 1:]
        label_mod = torch.where(masked, modality_ids, label_mod)
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None]
        block = suffix[:, :, None] & suffix[:, None, :]
        return Prepared(input_ids, modality_ids, labels, label_mod, causal | block)


def _gamma(alpha: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) draws from a torch.Generator (Marsaglia-Tsang; alpha < 1 by boosting)."""
    out = torch.empty_like(alpha)
    for i, a in enumerate(alpha.tolist()):
        boost = a < 1.0
        d = (a + 1.0 if boost else a) - 1.0 / 3.0
        c = 1.0 / (9.0 * d) ** 0.5
        while True:
            x = float(torch.randn(1, generator=g))
            v = (1.0 + c * x) ** 3
            if v <= 0:
                continue
            u = float(torch.rand(1, generator=g))
            if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
                val = d * v
                break
        if boost:
            val *= float(torch.rand(1, generator=g)) ** (1.0 / a)
        out[i] = val
    return out


def objective_config_from_dict(section, where: str) -> ObjectiveConfig:
    """An `objective:` section -> ObjectiveConfig, its `kind` checked against the registry (the
    modality names in it are checked by build_objective, which has the vocabulary)."""
    return OBJECTIVES.config_from_dict(section, where)


def build_objective(cfg: ObjectiveConfig, vocab) -> Objective:
    """The objective `cfg.kind` names; raises ValueError('<field>: why') for a bad config."""
    cfg.validate(vocab.modality_names)
    return OBJECTIVES.build(cfg.kind, cfg, vocab)


def loss_and_report(logits: torch.Tensor, prep: Prepared, weights: torch.Tensor, denominator: float | None = None):
    """Weighted mean cross-entropy over labelled positions, and per-modality (sum, count) for reports.

    loss = sum_t w[mod_t] * ce_t / sum_t w[mod_t] over positions with a label. Returns
    (loss, sums [G], counts [G]) where sums/counts are the unweighted CE sums and label counts per
    modality (detached; divide after summing over micro-batches and ranks). `denominator` replaces
    sum_t w[mod_t] (the trainer passes 1.0 and divides by the whole global batch's weight itself).
    This is the plain path (full logits); training uses `model_loss_and_report`, which gives the
    same values without materialising the logits."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    labels = prep.labels.reshape(-1)
    has = labels != IGNORE
    ce = F.cross_entropy(flat, labels.clamp_min(0), reduction="none") * has
    w = weights.to(ce.device)[prep.label_mod.reshape(-1)] * has
    return _finish(ce, (ce * w).sum(), w, prep, len(weights), denominator)


def model_loss_and_report(model, prep: Prepared, weights: torch.Tensor, denominator: float | None = None):
    """loss_and_report's results through the model's fused loss path (Transformer.loss: output
    projection + cross-entropy in row chunks, only over labelled positions). `model` is the
    Transformer or a DeepSpeed engine wrapping it (called as forward(..., labels=, label_weights=),
    so engine hooks such as ZeRO-3 parameter gathering apply)."""
    has = prep.labels != IGNORE
    w = weights.to(prep.labels.device)[prep.label_mod] * has
    total, ce = model(prep.input_ids, prep.modality_ids, prep.attn_mask, labels=prep.labels, label_weights=w)
    return _finish(ce.reshape(-1), total, w.reshape(-1), prep, len(weights), denominator)


def _finish(ce, weighted_sum, w, prep: Prepared, G: int, denominator):
    loss = weighted_sum / (w.sum().clamp_min(1e-8) if denominator is None else denominator)
    mods = prep.label_mod.reshape(-1)
    has = prep.labels.reshape(-1) != IGNORE
    with torch.no_grad():
        sums = torch.zeros(G, dtype=torch.float64, device=ce.device).index_add_(0, mods, ce.detach().double())
        counts = torch.zeros(G, dtype=torch.float64, device=ce.device).index_add_(0, mods, has.double())
    return loss, sums, counts
