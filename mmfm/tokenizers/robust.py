"""Robust latents: latent perturbation in tokenizer training and the perturbed-reconstruction metric
(RobustTok, Qiu et al. 2025, "Robust Latent Matters: Boosting Image Generation with Sampling Error
Synthesis", arXiv:2503.08354).

An AR model that generates tokens sometimes samples a wrong one; a decoder that has only ever seen
the encoder's own token sequences may turn that one wrong token into a visible artefact. The paper
simulates these sampling errors while the tokenizer trains: with rate alpha each token's quantized
latent is replaced by another codebook entry, one of the delta nearest, on a share beta of the
batch's images, so the decoder learns to decode imperfect sequences. Its metric (pFID) is the
reconstruction quality of perturbed token sequences; here that is PSNR (`perturbed_psnr`).

Two choices of this implementation, both so that one function serves training and the metric:
  - the neighbours of a token are the codes nearest to its own code e_k, not to the encoder output z
    the paper ranks by; this needs only the token id, so the metric can perturb any tokenizer's token
    sequences. With delta much smaller than the codebook the two sets mostly coincide.
  - a replaced token always changes (the paper draws from the delta nearest including the token's own
    code, so its effective rate is alpha (1 - 1/delta)); here `rate` is the share of tokens changed.
neighbours = 0 draws the replacement uniformly from all other codes: the harshest error, and the one
that needs no code vectors at all.

Code vectors come from `quantizer.decode(arange(V))` (VQ's codebook, FSQ's grid, LFQ's signs), so
every quantizer the image tokenizers can name is covered.
"""
from __future__ import annotations

import torch

MAX_TABLE_CODES = 1 << 16      # a [V, V] distance matrix for the neighbour table stays under 16 GiB


def check_perturbation_fields(rate: float, neighbours: int, images: float, vocab_size: int | None,
                              quantizer: str) -> None:
    """Raise ValueError('<field>: ...') (config.py prefixes the file and 'model.')."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturb_rate: the share of tokens replaced in training must be in [0, 1], got {rate}")
    if not 0.0 < images <= 1.0:
        raise ValueError(f"perturb_images: the share of a batch's images perturbed must be in (0, 1], got {images}")
    if neighbours < 0:
        raise ValueError(f"perturb_neighbours: must be >= 0 (0 = any other code), got {neighbours}")
    if rate > 0 and quantizer == "none":
        raise ValueError("perturb_rate: latent perturbation replaces codes; quantizer 'none' has none (set "
                         "perturb_rate: 0 or choose vq, fsq or lfq)")
    if vocab_size is not None and rate > 0:
        if neighbours >= vocab_size:
            raise ValueError(f"perturb_neighbours: {neighbours} neighbours need more than {neighbours} codes, the "
                             f"codebook has {vocab_size}")
        if neighbours and vocab_size > MAX_TABLE_CODES:
            raise ValueError(f"perturb_neighbours: a nearest-code table over {vocab_size} codes is too large "
                             f"(at most {MAX_TABLE_CODES}); use perturb_neighbours: 0 (any other code)")


def code_table(quantizer, vocab_size: int) -> torch.Tensor:
    """[V, D] float code vectors of every token id, detached."""
    with torch.no_grad():
        dev = next(iter(quantizer.buffers()), torch.empty(0)).device
        return quantizer.decode(torch.arange(vocab_size, device=dev)).float().detach()


def neighbour_table(codes: torch.Tensor, k: int) -> torch.Tensor:
    """[V, k] int64: for each code, the k nearest other codes (squared L2), nearest first."""
    d = torch.cdist(codes, codes)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).indices


def replace_tokens(tokens: torch.Tensor, rate: float, vocab_size: int, generator: torch.Generator,
                   neighbours: torch.Tensor | None = None, row_mask: torch.Tensor | None = None):
    """tokens [B, ...] int64 -> (new tokens, replaced mask). Each token is replaced with probability
    `rate` (rows where row_mask is False never are) by a different code: uniformly one of
    `neighbours[token]` ([V, k] from neighbour_table) or, when neighbours is None, uniformly any other
    code. Draws come from `generator` (CPU), so a run is reproducible."""
    shape = tokens.shape
    flat = tokens.reshape(-1).cpu()
    u = torch.rand(flat.shape, generator=generator)
    mask = u < rate
    if row_mask is not None:
        mask &= row_mask.cpu().reshape(shape[0], *([1] * (len(shape) - 1))).expand(shape).reshape(-1)
    if neighbours is None:
        other = torch.randint(vocab_size - 1, flat.shape, generator=generator)
        repl = other + (other >= flat).long()            # skip the token's own id: always a change
    else:
        nb = neighbours.cpu()
        pick = torch.randint(nb.shape[1], flat.shape, generator=generator)
        repl = nb[flat, pick]
    out = torch.where(mask, repl, flat)
    return out.reshape(shape).to(tokens.device), mask.reshape(shape).to(tokens.device)


class LatentPerturbation:
    """Training-time perturbation of a quantizer's output (the tokenizer calls it in training mode only).

    perturb(z, quantized, indices): z [..., D] the encoder output, quantized its straight-through
    codes, indices their ids [B, ...]. Returns the latents the decoder reads: at the replaced tokens
    z + sg(e_new - z) (straight-through, as the quantizer's own output, so the encoder still gets a
    gradient there), elsewhere `quantized` unchanged; and the share of tokens replaced (a metric)."""

    def __init__(self, rate: float, neighbours: int, images: float, vocab_size: int, seed: int):
        self.rate, self.k, self.images, self.vocab_size = rate, neighbours, images, vocab_size
        self.generator = torch.Generator().manual_seed(seed + 7919)   # apart from the tokenizer's other draws

    def perturb(self, quantizer, z: torch.Tensor, quantized: torch.Tensor, indices: torch.Tensor):
        codes = code_table(quantizer, self.vocab_size)           # the codebook moves while training
        nb = neighbour_table(codes, self.k) if self.k else None
        rows = torch.rand(indices.shape[0], generator=self.generator) < self.images
        new, mask = replace_tokens(indices, self.rate, self.vocab_size, self.generator, nb, rows)
        e = codes[new].to(z.dtype)
        swapped = z + (e - z).detach()
        out = torch.where(mask[..., None], swapped, quantized)
        return out, float(mask.float().mean())


@torch.no_grad()
def perturbed_reconstructions(tok, x: torch.Tensor, fractions, seed: int = 0, neighbours: int = 0,
                              batch: int = 16) -> dict[float, torch.Tensor]:
    """{fraction: decoded images [B, 3, S, S]} of x's token sequences with `fraction` of the tokens
    replaced (uniformly any other code, or one of the `neighbours` nearest codes when > 0); fraction 0
    is the clean round trip. Works for any image tokenizer with encode_batch / decode; neighbours > 0
    needs one whose `quantizer` decodes ids to code vectors. Every fraction starts from the same seed,
    so two tokenizers compared see the same positions replaced."""
    tokens = torch.cat([tok.encode_batch(b) for b in x.split(batch)])
    nb = None
    if not 0 <= neighbours < tok.vocab_size:
        raise ValueError(f"perturbed_reconstructions: argument 'neighbours' must be in [0, {tok.vocab_size}) "
                         f"(the tokenizer's vocab_size), got {neighbours}")
    if neighbours:
        quantizer = getattr(tok, "quantizer", None)
        if quantizer is None or not hasattr(quantizer, "decode"):
            raise ValueError(f"perturbed_reconstructions: argument 'neighbours' ({neighbours}) needs a tokenizer "
                             f"with a code table; {type(tok).__name__} has no quantizer")
        nb = neighbour_table(code_table(quantizer, tok.vocab_size), neighbours)
    out = {}
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"perturbed_reconstructions: every fraction must be in [0, 1], got {f}")
        g = torch.Generator().manual_seed(seed)
        t = replace_tokens(tokens, float(f), tok.vocab_size, g, nb)[0] if f > 0 else tokens
        out[f] = torch.cat([tok.decode(b) for b in t.split(batch)])
    return out


def perturbed_psnr(tok, x: torch.Tensor, fractions, seed: int = 0, neighbours: int = 0) -> dict[str, float]:
    """{'psnr_p5': ..., ...}: held-out PSNR of x decoded from perturbed tokens, one field per fraction
    (the fields `mmfm tokenizer eval` reports beside the clean 'psnr')."""
    from mmfm.tokenizers.metrics import psnr

    recon = perturbed_reconstructions(tok, x, fractions, seed, neighbours)
    return {f"psnr_{fraction_label(f)}": psnr(x, r) for f, r in recon.items()}


def fraction_label(f: float) -> str:
    """0.05 -> 'p5', 0.125 -> 'p12.5': the suffix of the perturbed metric's field names."""
    pct = round(100 * f, 4)
    return f"p{int(pct) if pct == int(pct) else pct}"
