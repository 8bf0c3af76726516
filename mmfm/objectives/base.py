"""Objectives (see the package docstring) and the shared loss with its per-modality report."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmfm.registry import Registry

IGNORE = -100
LOSS_ON = ("all", "generated")
# Every objective shares ObjectiveConfig; its `kind` field names the class.
OBJECTIVES = Registry("objective", field="kind", default="ar", modules=("mmfm.objectives",))


@dataclass
class ObjectiveConfig:
    kind: str = "ar"                  # ar, masked, hybrid: a name in OBJECTIVES
    # ar: each packed sample (from its <bos>) attends only to itself, as it will at generation, where
    # a prompt has no earlier samples before it (without it, a caption can lean on a previous sample's)
    # (positions restart at 0 with every sample, so a packed sample computes what it would alone)
    document_mask: bool = False
    # ar: which tokens get a loss. all; or generated: only each packed sample's last modality segment
    # (the tokens after its last <begin_M>, through <end_M> and <eos>), what a prompt asks the model
    # to generate: image-then-caption data trains the caption only, caption-then-image the image only.
    # masked / hybrid with generated (MaskGIT / Muse, conditional BAMM): masks fall only on the last
    # segment's modality tokens, everything before it is always seen - the condition masked decoding
    # of a prompt's segment meets (the whole caption given, the image masked at the schedule's ratio),
    # which the 4M budgets over all modalities rarely draw
    loss_on: str = "all"
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
    mask_ratio: float = 0.5           # also masked with loss_on generated: the segment's masked share
    # masked and hybrid: "fixed" (the budgets / mask_ratio above) or "cosine" (MMM, MaskGIT): each
    # sequence draws its own mask ratio r = cos(pi/2 * u), u ~ U(0, 1), so training sees every ratio
    # that iterative decoding's cosine schedule passes through, from all-masked (its first step) to
    # nearly none; masked: inputs are (1 - r) of the valid tokens and the targets are the masked ones,
    # at most target_fraction of the valid tokens; hybrid: r replaces mask_ratio
    mask_schedule: str = "fixed"
    # models with a flow head (model.flow_latent_dim > 0) and batches with latents: the weight of its
    # flow-matching error against the token loss; both are sums divided by the same label count, so
    # one flow target weighs flow_weight x one token's cross-entropy. 0: the head is not trained
    flow_weight: float = 1.0

    def validate(self, names: list[str]) -> None:
        OBJECTIVES.get(self.kind)   # "kind: unknown objective ...; expected one of: ..."
        _check_loss_on(self)
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
        fw = self.flow_weight
        if isinstance(fw, bool) or not isinstance(fw, (int, float)) or not fw >= 0:
            raise ValueError(f"flow_weight: expected a number >= 0, got {self.flow_weight!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule: expected one of {', '.join(MASK_SCHEDULES)}, got {self.mask_schedule!r}")


MASK_SCHEDULES = ("fixed", "cosine")


def cosine_mask_ratio(n: int, generator=None) -> torch.Tensor:
    """[n] mask ratios r = cos(pi/2 * u), u ~ U(0, 1) (MaskGIT / MMM training): the ratios the
    cosine decoding schedule visits, each equally often; E[r] = 2/pi."""
    return torch.cos(math.pi / 2 * torch.rand(n, generator=generator))


@dataclass
class Prepared:
    input_ids: torch.Tensor
    modality_ids: torch.Tensor
    labels: torch.Tensor
    label_mod: torch.Tensor
    attn_mask: torch.Tensor | None
    # [B, L] which packed sample of its row each token is (objective.document_mask): the model
    # then attends within samples and restarts positions (mmfm/models/transformer.py); attn_mask None
    doc_ids: torch.Tensor | None = None
    # continuous targets for a flow head (mmfm/models/flow_head.py): latents [B, L, D] float, the
    # vector the hidden state AT each position predicts (already shifted), where latent_mask [B, L]
    latents: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None

    def rows(self, rows, device=None) -> "Prepared":
        """These rows of the batch (a micro-batch), moved to `device` when given (the global batch is
        prepared on the CPU; a micro-batch goes to the model's device)."""
        def pick(t):
            return None if t is None else t[rows] if device is None else t[rows].to(device)

        return Prepared(pick(self.input_ids), pick(self.modality_ids), pick(self.labels), pick(self.label_mod),
                        pick(self.attn_mask), pick(self.doc_ids), pick(self.latents), pick(self.latent_mask))

    def with_latents(self, latents: torch.Tensor, latent_mask: torch.Tensor) -> "Prepared":
        """This batch with flow-head targets (see the fields); checked against input_ids' [B, L]."""
        B, L = self.input_ids.shape
        if latents.dim() != 3 or latents.shape[:2] != (B, L) or latent_mask.shape != (B, L):
            raise ValueError(f"latents / latent_mask: expected [B, L, D] and [B, L] with [B, L] = {[B, L]}, got "
                             f"{list(latents.shape)} and {list(latent_mask.shape)}")
        if not torch.isfinite(latents[latent_mask]).all():
            raise ValueError("latents: non-finite values at positions latent_mask selects")
        return dataclasses.replace(self, latents=latents.float(), latent_mask=latent_mask.bool())


def generated_segment(vocab, ids) -> torch.Tensor:
    """bool [B, L]: the token lies after the last <begin_M> marker of its packed sample (a sample
    starts at <bos>): the segment a prompt would ask the model to generate, through <end_M> and <eos>."""
    B, L = ids.shape
    doc = (ids == vocab.bos_id).long().cumsum(1)
    begins = torch.tensor([vocab.begin_id(m) for m in vocab.ranges], dtype=ids.dtype)
    t = torch.arange(L).expand(B, L)
    key = doc + torch.arange(B)[:, None] * (L + 1)                       # one slot per (row, sample)
    at = torch.where(torch.isin(ids, begins), t, torch.full_like(t, -1))
    last = torch.full((B * (L + 1),), -1, dtype=t.dtype).scatter_reduce(0, key.reshape(-1), at.reshape(-1), "amax")
    last = last[key]
    return (last >= 0) & (t > last)


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

    def _segment(self, ids, modality_ids, valid) -> torch.Tensor:
        """bool [B, L]: the modality tokens of each sample's generated segment (loss_on generated):
        what masked decoding of a prompt regenerates (not <end_M> / <eos>, which it is given)."""
        content = torch.zeros_like(valid)
        for r in self.vocab.ranges.values():     # a modality's own tokens; its markers are outside its range
            content |= (ids >= r.start) & (ids < r.stop)
        return generated_segment(self.vocab, ids) & valid & content

    def _ratios(self, B: int, generator) -> torch.Tensor:
        """[B] mask ratios: cosine-drawn (mask_schedule cosine) or mask_ratio."""
        if self.cfg.mask_schedule == "cosine":
            return cosine_mask_ratio(B, generator)
        return torch.full((B,), float(self.cfg.mask_ratio))


@OBJECTIVES.register("ar", ObjectiveConfig)
class AR(Objective):
    """Next-token prediction: position t predicts ids[t + 1]; padding and no_loss modalities get none."""

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], IGNORE)
        label_mod = torch.zeros_like(ids)
        label_mod[:, :-1] = modality_ids[:, 1:]
        doc = (ids == self.vocab.bos_id).long().cumsum(1)                    # [B, L]: which sample
        if self.cfg.loss_on == "generated":
            target = torch.zeros_like(valid)
            target[:, :-1] = generated_segment(self.vocab, ids)[:, 1:]
            labels = torch.where(target, labels, IGNORE)
        if not self.cfg.document_mask:
            return Prepared(ids, modality_ids, labels, label_mod, None)
        # a sample's last token would predict the next sample's <bos>: no label across samples, so a
        # packed row's loss is the sum of its samples' own losses
        labels[:, :-1] = torch.where(doc[:, 1:] != doc[:, :-1], IGNORE, labels[:, :-1])
        return Prepared(ids, modality_ids, labels, label_mod, None, doc)


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
        if self.cfg.loss_on == "generated":
            return self._prepare_generated(ids, modality_ids, valid, generator)
        B, L = ids.shape
        G = len(self.names)
        inp = torch.zeros(B, L, dtype=torch.bool)
        tgt = torch.zeros(B, L, dtype=torch.bool)
        ratio = cosine_mask_ratio(B, generator) if self.cfg.mask_schedule == "cosine" else None
        for b in range(B):
            n = int(valid[b].sum())
            counts = torch.bincount(modality_ids[b][valid[b]], minlength=G)
            if ratio is None:
                in_budget, tg_budget = max(1, int(self.cfg.input_fraction * n)), max(1, int(self.cfg.target_fraction * n))
            else:   # at least one target; the rest of the masked share beyond target_fraction is unseen, unscored
                in_budget = min(n - 1, int(round((1.0 - float(ratio[b])) * n)))
                tg_budget = max(1, min(n - in_budget, int(self.cfg.target_fraction * n)))
            n_in = self._split(in_budget, counts, generator)
            n_tg = self._split(tg_budget, counts, generator)
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

    def _prepare_generated(self, ids, modality_ids, valid, generator) -> Prepared:
        """loss_on generated (MaskGIT / Muse): round(r * n) of the n tokens of each row's generated
        segment (at least one) read <mask> and are predicted; every other valid token is seen."""
        B, L = ids.shape
        seg = self._segment(ids, modality_ids, valid)
        ratio = self._ratios(B, generator)
        masked = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            pos = torch.nonzero(seg[b]).flatten()
            if len(pos):
                k = max(1, int(round(float(ratio[b]) * len(pos))))
                masked[b, pos[torch.randperm(len(pos), generator=generator)[:k]]] = True
        input_ids = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        labels = torch.where(masked, ids, IGNORE)
        attn = (valid[:, None, :] & valid[:, :, None]) | torch.eye(L, dtype=torch.bool)[None]
        return Prepared(input_ids, modality_ids, labels, modality_ids.clone(), attn)


@OBJECTIVES.register("hybrid", ObjectiveConfig)
class Hybrid(Objective):
    """BAMM-style hybrid: positions [0, s) are autoregressive (causal, predict the next token);
    positions [s, L) are a masked block: mask_ratio of them read <mask> and predict themselves, they
    attend to the whole prefix and bidirectionally to each other. s is drawn per sequence.

    loss_on generated (conditional BAMM): s is drawn uniformly over the row's generated segment
    (from its first token: the whole segment is the block, as in MaskGIT decoding of it under the
    hybrid attention; to its last: nearly all of it causal, as in the cascade's draft), and masks
    fall only on the segment's modality tokens: the prompt before it is always causal context."""

    def prepare(self, ids, modality_ids, valid, generator=None) -> Prepared:
        B, L = ids.shape
        u = torch.rand(B, generator=generator)
        n_valid = valid.sum(1)
        pos = torch.arange(L)
        if self.cfg.loss_on == "generated":
            seg = self._segment(ids, modality_ids, valid)
            count = seg.sum(1)
            first = torch.where(seg, pos, L).amin(1)
            s = torch.where(count > 0, first + (u * count).long(), n_valid).clamp(1, L - 1)
            maskable = seg
        else:
            s = (n_valid.float() * (self.cfg.min_prefix + (1 - self.cfg.min_prefix) * u)).long().clamp(1, L - 1)
            maskable = valid
        suffix = pos[None, :] >= s[:, None]                                        # [B, L]
        ratio = self._ratios(B, generator)[:, None]
        masked = suffix & maskable & (torch.rand(B, L, generator=generator) < ratio)
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
    from mmfm.typed_config import ConfigError

    cfg = OBJECTIVES.config_from_dict(section, where)
    try:
        _check_loss_on(cfg)
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    return cfg


def _check_loss_on(cfg: ObjectiveConfig) -> None:
    if cfg.loss_on not in LOSS_ON:
        raise ValueError(f"loss_on: expected one of {', '.join(LOSS_ON)}, got {cfg.loss_on!r}")
    if cfg.loss_on != "all" and cfg.kind not in ("ar", "masked", "hybrid"):
        raise ValueError(f"loss_on: {cfg.loss_on!r} is for kinds ar, masked and hybrid; kind {cfg.kind!r} chooses its "
                         "own targets")


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
    extra = {} if prep.doc_ids is None else {"doc_ids": prep.doc_ids}   # other models need not know doc_ids
    total, ce = model(prep.input_ids, prep.modality_ids, prep.attn_mask, labels=prep.labels, label_weights=w, **extra)
    return _finish(ce.reshape(-1), total, w.reshape(-1), prep, len(weights), denominator)


def joint_loss_and_report(model, prep: Prepared, weights: torch.Tensor, flow_weight: float,
                          denominator: float | None = None):
    """The token loss (model_loss_and_report) plus flow_weight x the flow head's summed errors, over
    the same denominator: (loss, sums [G], counts [G], flow error sum, flow target count), the last
    two detached. Without latents in prep, or at flow_weight 0, the head is not run and the loss is
    model_loss_and_report's, bit for bit."""
    if prep.latents is None or flow_weight == 0:
        loss, sums, counts = model_loss_and_report(model, prep, weights, denominator)
        return loss, sums, counts, 0.0, 0.0
    has = prep.labels != IGNORE
    w = weights.to(prep.labels.device)[prep.label_mod] * has
    extra = {} if prep.doc_ids is None else {"doc_ids": prep.doc_ids}
    total, ce, flow = model(prep.input_ids, prep.modality_ids, prep.attn_mask, labels=prep.labels, label_weights=w,
                            flow_latents=prep.latents, flow_mask=prep.latent_mask, **extra)
    total = total + flow_weight * flow.sum().to(total.dtype)
    loss, sums, counts = _finish(ce.reshape(-1), total, w.reshape(-1), prep, len(weights), denominator)
    return loss, sums, counts, float(flow.detach().sum()), float(flow.numel())


def _finish(ce, weighted_sum, w, prep: Prepared, G: int, denominator):
    loss = weighted_sum / (w.sum().clamp_min(1e-8) if denominator is None else denominator)
    mods = prep.label_mod.reshape(-1)
    has = prep.labels.reshape(-1) != IGNORE
    with torch.no_grad():
        sums = torch.zeros(G, dtype=torch.float64, device=ce.device).index_add_(0, mods, ce.detach().double())
        counts = torch.zeros(G, dtype=torch.float64, device=ce.device).index_add_(0, mods, has.double())
    return loss, sums, counts
