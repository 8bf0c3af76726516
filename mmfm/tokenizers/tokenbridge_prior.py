"""TokenBridge's light per-dimension autoregressive head, and a small prior that measures it.

TokenBridge (arXiv:2503.16430) quantizes each of a latent's C channels on its own (num_bins ids
each; mmfm/tokenizers/tokenbridge.py). One spatial position is then a C-tuple of bins, a joint
vocabulary of num_bins^C. The paper does not flatten the tuple into C positions of the backbone
sequence, nor predict the C bins independently: the backbone emits one hidden state h per spatial
position and a light head factorises the tuple autoregressively over channels,

    p(b_1..b_C | h) = prod_c p(b_c | b_<c, h).

`DimwiseARHead` is that head: a one-layer causal transformer over the C channel slots whose slot c
sees h, its channel's embedding and the bin chosen at slot c - 1. Teacher-forced in training (all
slots in one pass), sampled slot by slot.

`train_prior` fits a small causal transformer over a tokenizer's positions with one of three
heads, so the head's effect is measured on the same tokens at the same backbone size:
    independent  one linear layer -> C softmaxes (the channels of a position drawn independently)
    dimwise_ar   DimwiseARHead
    flattened    no head: the backbone runs over the C x positions flattened ids (what the unified
                 model does with image_tokenbridge tokens today), C times the sequence length
The figure is held-out negative log-likelihood in bits per image; `mmfm tokenizer prior` prints it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("independent", "dimwise_ar", "flattened")


class DimwiseARHead(nn.Module):
    """p(b_1..b_C | h) = prod_c p(b_c | b_<c, h) for hidden states h [N, hidden] and bins [N, C]."""

    def __init__(self, hidden: int, num_channels: int, num_bins: int, width: int = 64, heads: int = 4):
        super().__init__()
        if num_channels < 1 or num_bins < 2 or width % heads:
            raise ValueError(f"DimwiseARHead: need num_channels >= 1, num_bins >= 2 and width divisible by heads, "
                             f"got {num_channels}, {num_bins}, {width}, {heads}")
        self.num_channels, self.num_bins = num_channels, num_bins
        self.cond = nn.Linear(hidden, width)
        self.channel = nn.Parameter(torch.randn(num_channels, width) * 0.02)
        self.prev_bin = nn.Embedding(num_bins + 1, width)     # id num_bins: "no previous channel" at slot 0
        self.block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_bins)
        self.register_buffer("mask", torch.triu(torch.full((num_channels, num_channels), float("-inf")), 1),
                             persistent=False)

    def logits(self, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [N, C, num_bins]; slot c's logits depend on bins[:, :c] only."""
        if bins.dim() != 2 or bins.shape[1] != self.num_channels or bins.shape[0] != h.shape[0]:
            raise ValueError(f"DimwiseARHead: bins must be [N = {h.shape[0]}, {self.num_channels}], "
                             f"got {tuple(bins.shape)}")
        start = torch.full_like(bins[:, :1], self.num_bins)
        prev = torch.cat([start, bins[:, :-1]], 1)
        x = self.cond(h)[:, None] + self.channel + self.prev_bin(prev)
        c = self.num_channels
        return self.out(self.norm(self.block(x, src_mask=self.mask[:c, :c])))

    def loss(self, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Mean NLL (nats) per bin."""
        return F.cross_entropy(self.logits(h, bins).flatten(0, 1), bins.reshape(-1))

    @torch.no_grad()
    def sample(self, h: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None):
        """Bins [N, C] drawn channel by channel (temperature 0: argmax)."""
        bins = torch.zeros(h.shape[0], self.num_channels, dtype=torch.long, device=h.device)
        for c in range(self.num_channels):   # slot c ignores bins[:, c:], so the zeros there are harmless
            lg = self.logits(h, bins)[:, c]
            if temperature == 0:
                bins[:, c] = lg.argmax(-1)
            else:
                p = F.softmax(lg / temperature, -1)
                bins[:, c] = torch.multinomial(p, 1, generator=generator)[:, 0]
        return bins


class _Backbone(nn.Module):
    """Causal transformer over positions; position p sees the tuples of positions < p."""

    def __init__(self, length: int, num_channels: int, num_bins: int, width: int, depth: int, heads: int):
        super().__init__()
        self.bins = nn.ModuleList(nn.Embedding(num_bins, width) for _ in range(num_channels))
        self.start = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False)

    def forward(self, tuples: torch.Tensor) -> torch.Tensor:
        """tuples [B, L, C] -> h [B, L, width], h[:, p] a function of tuples[:, :p]."""
        emb = sum(e(tuples[..., c]) for c, e in enumerate(self.bins))
        x = torch.cat([self.start.expand(tuples.shape[0], 1, -1), emb[:, :-1]], 1) + self.pos
        return self.norm(self.blocks(x, mask=self.mask, is_causal=True))


class TokenPrior(nn.Module):
    """A small AR prior over tokens [B, L * C] (position-major, C channels per position)."""

    def __init__(self, head: str, positions: int, num_channels: int, num_bins: int, width: int = 64,
                 depth: int = 2, heads: int = 4):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"TokenPrior: argument 'head' must be one of {HEADS}, got {head!r}")
        self.head_kind, self.c, self.nb = head, num_channels, num_bins
        flat = head == "flattened"
        self.backbone = _Backbone(positions * (num_channels if flat else 1), 1 if flat else num_channels, num_bins,
                                  width, depth, heads)
        if head == "flattened":
            self.head = nn.Linear(width, num_bins)
        elif head == "independent":
            self.head = nn.Linear(width, num_channels * num_bins)
        else:
            self.head = DimwiseARHead(width, num_channels, num_bins, width, heads)

    def nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean NLL in nats per token of tokens [B, L * C]."""
        b = tokens.shape[0]
        if self.head_kind == "flattened":
            h = self.backbone(tokens[..., None])
            return F.cross_entropy(self.head(h).flatten(0, 1), tokens.reshape(-1))
        tuples = tokens.reshape(b, -1, self.c)
        h = self.backbone(tuples)
        if self.head_kind == "independent":
            return F.cross_entropy(self.head(h).reshape(-1, self.nb), tuples.reshape(-1))
        return self.head.loss(h.flatten(0, 1), tuples.flatten(0, 1))

    @property
    def sequence_length(self) -> int:
        return self.backbone.pos.shape[0]


@dataclass
class PriorResult:
    head: str
    bits_per_image: float      # held-out NLL
    train_bits_per_image: float
    sequence_length: int       # backbone positions per image
    parameters: int
    head_parameters: int


def train_prior(head: str, train: torch.Tensor, held: torch.Tensor, num_channels: int, num_bins: int,
                steps: int = 300, batch_size: int = 32, lr: float = 2e-3, width: int = 64, depth: int = 2,
                seed: int = 0) -> PriorResult:
    """Fit a TokenPrior with `head` on train tokens [N, L * C]; NLL of held [M, L * C] in bits per image."""
    if train.dim() != 2 or train.shape[1] % num_channels:
        raise ValueError(f"train_prior: tokens must be [N, positions x {num_channels}], got {tuple(train.shape)}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TokenPrior(head, train.shape[1] // num_channels, num_channels, num_bins, width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(train.shape[0], (batch_size,), generator=g)]
        loss = model.nll(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    def bits(t):   # summed over images, so a short last batch weighs what it holds
        return sum(float(model.nll(b)) * b.numel() for b in t.split(64)) / t.shape[0] / math.log(2)

    with torch.no_grad():
        held_bits, train_bits = bits(held), bits(train[: held.shape[0] * 4])
    return PriorResult(head, held_bits, train_bits, model.sequence_length,
                       sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.head.parameters()))
