"""Behaviour of the quantizer modules in mmfm.quantizers (built on mmfm.ops.quant)."""
from __future__ import annotations

import json

import pytest
import torch

from mmfm.quantizers import (FSQ, LFQ, DimensionwiseQuantizer, MultiScaleResidualVQ, QuantizerOutput, ResidualVQ,
                             SoftVQ, VectorQuantizer, load_quantizer, save_quantizer)


def clustered(n: int, centers: torch.Tensor, g: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    labels = torch.randint(centers.shape[0], (n,), generator=g)
    return centers[labels] + noise * torch.randn(n, centers.shape[1], generator=g)


@pytest.fixture
def centers():
    return 4.0 * torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def train(module, batches, steps: int):
    module.train()
    for _ in range(steps):
        module(batches())
    module.eval()


# ---------------------------------------------------------------------------------- VQ
def test_vq_ema_learns_clusters():
    # 32 clusters, 64 codes: with spare codes EMA k-means reliably covers every cluster (with exactly as
    # many codes as clusters it can settle in a local optimum where one code serves two clusters).
    centers = 4.0 * torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    vq = VectorQuantizer(16, 64, use_ema=True, decay=0.8, dead_threshold=1.0, seed=0)
    vq.eval()
    x = clustered(4096, centers, g)
    untrained = float(((vq(x).quantized - x) ** 2).mean())
    vq.train()
    for _ in range(40):
        out = vq(clustered(2048, centers, g))
    assert isinstance(out, QuantizerOutput) and out.loss.dim() == 0
    vq.eval()
    out = vq(x)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (4096,)
    mse = float(((out.quantized - x) ** 2).mean())
    assert float(out.metrics["usage"]) > 0.9, out.metrics
    assert mse < 0.02 < untrained, (mse, untrained)  # noise variance is 0.01 per dimension
    assert (torch.cdist(centers, vq.codebook).min(1).values < 0.5).all()
    assert float(out.metrics["perplexity"]) > 45
    assert 0.9 < float(vq.usage_fraction()) <= 1.0 and float(vq.perplexity()) > 45
    assert int(vq.code_usage.sum()) == 40 * 2048
    assert list(vq.parameters()) == []  # EMA mode: the codebook is a buffer


@pytest.mark.parametrize("revive", [True, False])
def test_vq_dead_code_revival_from_collapse(centers, revive):
    g = torch.Generator().manual_seed(3)
    vq = VectorQuantizer(16, 64, use_ema=True, decay=0.8, dead_threshold=1.0 if revive else 0.0)
    with torch.no_grad():  # every code at one point, far from the data
        vq.codebook.fill_(30.0)
        vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    vq.train()
    first = vq(clustered(2048, centers, g))
    assert float(first.metrics["usage"]) == 1 / 64  # all rows tie on the lowest index
    for _ in range(30):
        vq(clustered(2048, centers, g))
    vq.eval()
    usage = float(vq(clustered(4096, centers, g)).metrics["usage"])
    if revive:
        assert usage > 0.9
    else:
        assert usage <= 1 / 64


def test_vq_revival_is_reproducible(centers):
    def run():
        vq = VectorQuantizer(16, 64, use_ema=True, decay=0.8, seed=5)
        g = torch.Generator().manual_seed(4)
        for _ in range(5):
            vq(clustered(512, centers, g))
        return vq.codebook.clone()

    assert torch.equal(run(), run())


def test_vq_revival_prefers_badly_served_rows():
    vq = VectorQuantizer(2, 4, use_ema=True, decay=0.5, dead_threshold=1.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
        vq.embed_sum.copy_(vq.codebook)
    rows = torch.zeros(100, 2)
    rows[[7, 42, 99]] = torch.tensor([[3.0, 0.0], [0.0, -4.0], [-5.0, 5.0]])
    vq.train()
    out = vq(rows)  # every row goes to code 0; codes 1..3 die; only three rows are off code 0
    assert float(out.metrics["revived"]) == 3
    revived = {tuple(r) for r in vq.codebook[1:].tolist()}
    assert revived == {(3.0, 0.0), (0.0, -4.0), (-5.0, 5.0)}


def test_vq_commitment_mode_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64, beta=0.25, seed=7)
    z = torch.randn(32, 8, requires_grad=True)
    out = vq(z)
    g = torch.randn_like(z)
    (out.quantized * g).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, g)  # straight-through: d quantized / dz = identity
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    z.grad = None
    out.loss.backward()
    k = out.indices
    e = vq.codebook.detach()[k]
    # loss = mse(e_k, sg z) + beta mse(z, sg e_k)
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - e) / z.numel(), atol=1e-7)
    expected = torch.zeros_like(vq.codebook).index_add_(0, k, 2 * (e - z.detach()) / z.numel())
    assert torch.allclose(vq.codebook.grad, expected, atol=1e-7)
    unused = torch.ones(64, dtype=torch.bool)
    unused[k] = False
    assert unused.any() and not vq.codebook.grad[unused].any() and vq.codebook.grad[~unused].abs().sum() > 0

    # an encoder in front receives gradient through the straight-through estimator
    enc = torch.nn.Linear(4, 8)
    x = torch.randn(32, 4)
    o = vq(enc(x))
    ((o.quantized - 1.0) ** 2).mean().backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


def test_vq_loss_mode_usage_ema_and_revival():
    vq = VectorQuantizer(4, 8, decay=0.5, dead_threshold=1.0)
    with torch.no_grad():
        vq.codebook.fill_(100.0)
    vq.train()
    out = vq(torch.randn(256, 4))
    assert float(out.metrics["revived"]) == 7  # codes 1..7 unused: EMA count 0.5 < 1
    assert torch.allclose(vq.cluster_size[0], torch.tensor(0.5 + 0.5 * 256))
    assert (vq.codebook.detach()[1:].abs() < 10).all()


def test_vq_cosine_outputs_unit_codes():
    vq = VectorQuantizer(8, 32, cosine=True).eval()
    out = vq(torch.randn(100, 8) * 5)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(100), atol=1e-5)
    assert torch.allclose(vq.decode(out.indices), out.quantized, atol=1e-6)


def test_vq_sync_fn_is_explicit_and_applied():
    calls = []

    def fake_all_reduce(t):  # two identical ranks, reduced in place like torch.distributed.all_reduce
        calls.append(tuple(t.shape))
        t.mul_(2)

    x = torch.randn(128, 4)
    a = VectorQuantizer(4, 8, use_ema=True, decay=0.9, dead_threshold=0.0, sync_fn=fake_all_reduce)
    b = VectorQuantizer(4, 8, use_ema=True, decay=0.9, dead_threshold=0.0)
    a.train(), b.train()
    out_a, out_b = a(x), b(x)
    assert calls == [(8, 4), (8,)]
    assert torch.equal(out_a.indices, out_b.indices)  # same seed, same codebook before the update
    counts = torch.bincount(out_b.indices, minlength=8).float()
    assert torch.allclose(a.cluster_size, 0.9 + 0.1 * 2 * counts)
    assert torch.allclose(b.cluster_size, 0.9 + 0.1 * counts)
    assert torch.equal(a.code_usage, 2 * b.code_usage)
    a.eval()
    calls.clear()
    a(x)
    assert calls == []  # eval does not reduce anything


def test_vq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ours = VectorQuantizer(16, 64).eval()
    ref = vqp.VectorQuantize(dim=16, codebook_size=64, kmeans_init=False).eval()
    with torch.no_grad():
        ref._codebook.embed.copy_(ours.codebook.detach()[None])
    x = torch.randn(4, 50, 16)
    _, ref_idx, _ = ref(x)
    assert torch.equal(ours(x).indices, ref_idx)


# ----------------------------------------------------------------------------- FSQ / LFQ
def test_fsq_round_trip_and_range():
    fsq = FSQ([8, 5, 5, 5])
    assert fsq.codebook_size == 1000
    u = torch.rand(50_000, 4, generator=torch.Generator().manual_seed(0)) * 1.98 - 0.99
    z = torch.atanh(u).requires_grad_()  # about even over the levels of the tanh bound
    out = fsq(z)
    assert out.indices.dtype == torch.int64 and float(out.loss) == 0.0
    assert torch.equal(fsq.decode(out.indices), out.quantized.detach())
    assert torch.equal(fsq.encode(z), out.indices)
    assert out.indices.unique().numel() == 1000 and int(out.indices.min()) == 0 and int(out.indices.max()) == 999
    grid = fsq.decode(torch.arange(1000))
    assert grid.unique(dim=0).shape[0] == 1000 and grid.abs().max() <= 1
    assert torch.equal(fsq.decode(fsq.encode(z)), out.quantized.detach())
    out.quantized.sum().backward()
    assert (z.grad > 0).all()  # straight-through the rounding, through the tanh bound


def test_lfq_round_trip_and_range():
    lfq = LFQ(8).eval()
    z = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0))
    out = lfq(z)
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(lfq.decode(out.indices), out.quantized)
    assert torch.equal(lfq.encode(z), out.indices)
    assert out.indices.unique().numel() == 256 and int(out.indices.max()) == 255 and int(out.indices.min()) == 0
    assert lfq.codebook_size == 256


def test_lfq_entropy_penalty_spreads_usage():
    torch.manual_seed(0)
    lfq = LFQ(6, entropy_weight=1.0, beta=0.0)
    z = (0.5 + 0.1 * torch.randn(512, 6)).requires_grad_()  # collapsed: nearly all on code 63
    opt = torch.optim.Adam([z], lr=0.05)
    start = float(lfq(z).metrics["usage"])
    first_entropy = None
    for _ in range(80):
        out = lfq(z)
        if first_entropy is None:
            first_entropy = float(out.metrics["codebook_entropy"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    end = lfq(z)
    assert start <= 2 / 64
    assert float(end.metrics["usage"]) > 0.75
    assert float(end.metrics["codebook_entropy"]) > first_entropy + 1.0


# --------------------------------------------------------------------------- ResidualVQ
def test_residual_vq_error_decreases_with_levels():
    g = torch.Generator().manual_seed(0)
    rvq = ResidualVQ(16, 32, num_levels=4, use_ema=True, decay=0.8)
    train(rvq, lambda: torch.randn(2048, 16, generator=g), 25)
    x = torch.randn(4096, 16, generator=g)
    idx = rvq.encode(x)
    errors = [float(((rvq.decode(idx, levels=n) - x) ** 2).mean()) for n in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * float(x.var())
    out = rvq(x)
    assert torch.equal(out.indices, idx)
    assert torch.allclose(out.quantized, rvq.decode(idx), atol=1e-5)
    assert torch.equal(rvq.decode(idx, levels=2), rvq.decode(idx[..., :2]))
    assert torch.equal(rvq.encode(x, levels=2), idx[..., :2])


def test_residual_vq_fused_eval_matches_training_loop():
    rvq = ResidualVQ(8, 16, num_levels=3, beta=0.25).eval()
    x = torch.randn(300, 8)
    fused = rvq(x)
    loop = rvq._forward_loop(x, 3)  # eval mode: no state updates
    assert torch.equal(fused.indices, loop.indices)
    assert torch.allclose(fused.quantized, loop.quantized, atol=1e-5)
    assert torch.allclose(fused.loss, loop.loss, rtol=1e-4)


def test_residual_vq_quantizer_dropout():
    def levels_seen(seed):
        rvq = ResidualVQ(8, 16, num_levels=4, quantizer_dropout=1.0, seed=seed)
        rvq.train()
        return [rvq(torch.randn(32, 8)).indices.shape[-1] for _ in range(30)]

    seen = levels_seen(0)
    assert len(set(seen)) > 1 and min(seen) >= 1 and max(seen) <= 4
    assert seen == levels_seen(0)
    rvq = ResidualVQ(8, 16, num_levels=4, quantizer_dropout=1.0).eval()
    assert rvq(torch.randn(5, 8)).indices.shape == (5, 4)  # no dropout in eval


# ------------------------------------------------------------------ MultiScaleResidualVQ
def smooth_sequences(b, t, d, g):
    pos = torch.linspace(0, 1, t)[None, :, None]
    coef = torch.randn(b, 3, d, generator=g)
    return coef[:, :1] + coef[:, 1:2] * torch.cos(3.14 * pos) + coef[:, 2:] * torch.cos(6.28 * pos) \
        + 0.1 * torch.randn(b, t, d, generator=g)


def test_multiscale_token_counts_and_error_decreases():
    g = torch.Generator().manual_seed(0)
    msq = MultiScaleResidualVQ(8, 64, scales=(1, 2, 4, 8), use_ema=True, decay=0.8)
    train(msq, lambda: smooth_sequences(256, 8, 8, g), 30)
    z = smooth_sequences(512, 8, 8, g)
    out = msq(z)
    assert [tuple(i.shape) for i in out.indices] == [(512, 1), (512, 2), (512, 4), (512, 8)]
    assert msq.num_tokens == sum(i.shape[1] for i in out.indices) == 15
    assert all(i.dtype == torch.int64 for i in out.indices)
    errors = [float(((msq.decode(out.indices[:k], length=8) - z) ** 2).mean()) for k in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert torch.allclose(msq.decode(out.indices), out.quantized, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(msq.encode(z), out.indices))


def test_multiscale_longer_sequences_and_bad_input():
    msq = MultiScaleResidualVQ(4, 16, scales=(1, 3, 6), upsample="nearest").eval()
    out = msq(torch.randn(2, 12, 4))
    assert out.quantized.shape == (2, 12, 4) and [i.shape[1] for i in out.indices] == [1, 3, 6]
    with pytest.raises(ValueError, match="'z'"):
        msq(torch.randn(2, 5, 4))


# ---------------------------------------------------------------- DimensionwiseQuantizer
def test_dimensionwise_quantile_bins(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(20_000, 6, generator=g) * torch.tensor([1, 2, 0.5, 3, 1, 1]) + torch.arange(6)
    data[:, 5] = torch.empty(20_000).exponential_(generator=g)  # a skewed channel
    dq = DimensionwiseQuantizer(6, 16).fit(data)
    ids = dq.encode(data)
    assert ids.shape == data.shape and ids.dtype == torch.int64 and int(ids.min()) == 0 and int(ids.max()) == 15
    for c in range(6):
        counts = torch.bincount(ids[:, c], minlength=16).float()
        assert (counts - 20_000 / 16).abs().max() <= 0.01 * 20_000 / 16, (c, counts)
    recon = dq.decode(ids)
    rel = ((recon - data) ** 2).mean(0) / data.var(0)
    assert (rel[:5] < 0.03).all() and rel[5] < 0.1, rel  # the exponential channel's tail bin costs more
    for c in range(6):  # each center lies inside its bin
        e = dq.edges[c]
        assert (dq.centers[c, 1:] >= e).all() and (dq.centers[c, :-1] <= e).all()
    z = torch.randn(3, 5, 6, requires_grad=True)
    out = dq(z)
    assert out.indices.shape == (3, 5, 6) and torch.allclose(out.quantized.detach(), dq.decode(out.indices))
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    save_quantizer(dq, tmp_path / "dq.safetensors")
    back = load_quantizer(tmp_path / "dq.safetensors")
    assert isinstance(back, DimensionwiseQuantizer) and bool(back.fitted)
    assert torch.equal(back.encode(data), ids) and torch.equal(back.decode(ids), recon)


def test_dimensionwise_median_centers_and_unfitted():
    dq = DimensionwiseQuantizer(2, 4, centers="median")
    with pytest.raises(ValueError, match="fit"):
        dq.decode(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="fit"):
        dq.encode(torch.zeros(3, 2))
    dq.fit(torch.arange(101.0)[:, None].repeat(1, 2))
    assert torch.allclose(dq.edges[0], torch.tensor([25.0, 50.0, 75.0]))
    assert torch.allclose(dq.centers[0], torch.tensor([12.5, 37.5, 62.5, 87.5]))


# ------------------------------------------------------------------------------- SoftVQ
@pytest.mark.parametrize("topk", [None, 4])
def test_softvq_low_temperature_is_hard_vq(topk):
    sv = SoftVQ(8, 32, temperature=1e-6, topk=topk)
    z = torch.randn(500, 8)
    out = sv(z)
    assert torch.equal(out.indices, sv.encode(z))
    assert torch.allclose(out.quantized, sv.decode(out.indices), atol=1e-5)
    vq = VectorQuantizer(8, 32).eval()
    with torch.no_grad():
        vq.codebook.copy_(sv.codebook)
    assert torch.equal(vq(z).indices, out.indices)


@pytest.mark.parametrize("topk", [None, 5])
def test_softvq_convex_combination(topk):
    sv = SoftVQ(8, 32, temperature=2.0, topk=topk, chunk=64)
    z = torch.randn(3, 70, 8)
    w, ids = sv.soft_assign(z)
    k = topk or 32
    assert w.shape == (3, 70, k) and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(3, 70), atol=1e-6)
    out = sv(z)
    expect = (w[..., None] * sv.codebook.detach()[ids]).sum(-2)
    assert torch.allclose(out.quantized, expect, atol=1e-5)
    assert not torch.allclose(out.quantized, sv.decode(out.indices), atol=1e-3)  # genuinely soft at tau = 2
    out.quantized.sum().backward()
    assert sv.codebook.grad.abs().sum() > 0


def test_softvq_topk_all_codes_equals_full():
    full = SoftVQ(8, 16, temperature=0.7)
    topk = SoftVQ(8, 16, temperature=0.7, topk=16)
    z = torch.randn(40, 8)
    assert torch.allclose(full(z).quantized, topk(z).quantized, atol=1e-5)


# ------------------------------------------------------------------------- save / load
def _models():
    fit_data = torch.randn(2000, 8, generator=torch.Generator().manual_seed(9))
    return [
        ("vq_loss", lambda: VectorQuantizer(8, 32, cosine=False, seed=3), (64, 8)),
        ("vq_ema_cos", lambda: VectorQuantizer(8, 32, use_ema=True, cosine=True, decay=0.9), (64, 8)),
        ("fsq", lambda: FSQ([8, 5, 5]), (64, 3)),
        ("lfq", lambda: LFQ(8, entropy_weight=0.2), (64, 8)),
        ("rvq", lambda: ResidualVQ(8, 16, num_levels=3, use_ema=True, quantizer_dropout=0.5), (64, 8)),
        ("msrvq", lambda: MultiScaleResidualVQ(8, 16, scales=(1, 2, 4)), (4, 16, 8)),
        ("dimwise", lambda: DimensionwiseQuantizer(8, 8).fit(fit_data), (64, 8)),
        ("softvq", lambda: SoftVQ(8, 32, temperature=0.5, topk=4), (64, 8)),
    ]


@pytest.mark.parametrize("name,make,shape", _models(), ids=[m[0] for m in _models()])
def test_safetensors_round_trip(tmp_path, name, make, shape):
    torch.manual_seed(0)
    module = make()
    module.train()
    for _ in range(3):  # move the buffers away from their initial values
        module(torch.randn(*shape))
    module.eval()
    z = torch.randn(*shape)
    ref = module(z)
    path = tmp_path / f"{name}.safetensors"
    module.save_safetensors(path)
    back = type(module).load_safetensors(path).eval()
    again = load_quantizer(path).eval()
    for other in (back, again):
        assert type(other) is type(module) and other.config == module.config
        out = other(z)
        assert torch.equal(out.quantized, ref.quantized)
        ref_idx = ref.indices if isinstance(ref.indices, list) else [ref.indices]
        out_idx = out.indices if isinstance(out.indices, list) else [out.indices]
        assert all(torch.equal(a, b) for a, b in zip(ref_idx, out_idx))
        assert torch.equal(out.loss, ref.loss)
        sd, sd2 = module.state_dict(), other.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["mmfm.quantizer"] == type(module).registry_name and json.loads(meta["mmfm.config"]) == module.config


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no known mmfm quantizer"):
        load_quantizer(tmp_path / "x.safetensors")
    FSQ([4, 4]).save_safetensors(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="FSQ"):
        LFQ.load_safetensors(tmp_path / "f.safetensors")


def test_load_passes_sync_fn(tmp_path):
    VectorQuantizer(4, 8, use_ema=True).save_safetensors(tmp_path / "v.safetensors")
    seen = []
    vq = load_quantizer(tmp_path / "v.safetensors", sync_fn=lambda t: seen.append(t.shape))
    vq.train()
    vq(torch.randn(16, 4))
    assert seen[:2] == [torch.Size([8, 4]), torch.Size([8])]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("build,arg", [
    (lambda: VectorQuantizer(16, 0), "codebook_size"),
    (lambda: VectorQuantizer(0, 8), "dim"),
    (lambda: VectorQuantizer(16, 8, decay=1.0), "decay"),
    (lambda: VectorQuantizer(16, 8, dead_threshold=-1), "dead_threshold"),
    (lambda: VectorQuantizer(16, 8)(torch.randn(4, 15)), "dim=16"),
    (lambda: FSQ([8, 1]), "levels"),
    (lambda: FSQ([]), "levels"),
    (lambda: FSQ([5, 5])(torch.randn(3, 4)), "'z'"),
    (lambda: LFQ(63), "dim"),
    (lambda: ResidualVQ(8, 16, num_levels=0), "num_levels"),
    (lambda: ResidualVQ(8, 0, num_levels=2), "codebook_size"),
    (lambda: ResidualVQ(8, 16, num_levels=2, quantizer_dropout=2.0), "quantizer_dropout"),
    (lambda: ResidualVQ(8, 16, num_levels=2).decode(torch.zeros(3, 2, dtype=torch.long), levels=3), "levels"),
    (lambda: MultiScaleResidualVQ(8, 16, scales=(2, 1)), "scales"),
    (lambda: MultiScaleResidualVQ(8, 16, upsample="cubic"), "upsample"),
    (lambda: DimensionwiseQuantizer(4, 1), "num_bins"),
    (lambda: DimensionwiseQuantizer(4, 8).decode(torch.zeros(2, 4, dtype=torch.long)), "fit"),
    (lambda: DimensionwiseQuantizer(4, 8).fit(torch.randn(10, 3)), "data"),
    (lambda: SoftVQ(8, 16, temperature=0.0), "temperature"),
    (lambda: SoftVQ(8, 16, topk=17), "topk"),
    (lambda: SoftVQ(8, 0), "codebook_size"),
    (lambda: VectorQuantizer(4, 8).decode(torch.tensor([8])), "indices"),
])
def test_bad_arguments_raise_value_error(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()
