"""Cache augmentation (mmfm/cacheaug): the training path (PrefixCache) scores exactly what the generation
path (KVCache + augment) scores; N = 0 is the plain decoder; a few DeepSpeed steps of
`mmfm cacheaug train` lower the ahead-token loss with the decoder's weights (hash) and outputs
(bit for bit) unchanged; save/load round trip; eval records; config errors name the field."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmfm.cacheaug import Coprocessor, augment, cached_ahead_nll, generate, load_coprocessor, save_coprocessor, weights_hash
from mmfm.cacheaug.config import load_aug_config
from mmfm.cacheaug.objective import ahead_nll, choose_points
from mmfm.models import KVCache, ModelConfig, Transformer
from mmfm.typed_config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


def _model(sparse=False, seed=0, vocab=50):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=vocab,
                      max_seq_len=128, modality_sparse=sparse, num_modalities=3 if sparse else 0)
    return Transformer(cfg).eval()


def _rows(ids, rows, pts, A):
    """(prefixes x_0 .. x_{p-1}, continuations x_p .. x_{p+A}) of each (row, point)."""
    return ([ids[r, :p] for r, p in zip(rows.tolist(), pts.tolist())],
            torch.stack([ids[r, p:p + A + 1] for r, p in zip(rows.tolist(), pts.tolist())]))


@pytest.mark.parametrize("sparse", [False, True])
def test_training_path_equals_generation_path(sparse):
    dec = _model(sparse)
    ids = torch.randint(0, 50, (3, 40))
    table = torch.arange(50) % 3 if sparse else None
    mods = None if table is None else table[ids]
    rows, pts = torch.tensor([0, 0, 1, 2]), torch.tensor([5, 20, 11, 30])
    prompts, targets = _rows(ids, rows, pts, 6)
    cp = Coprocessor.from_decoder(dec, 3, latent_group=1 if sparse else 0)
    with torch.no_grad():
        train_path = ahead_nll(dec, cp, ids, rows, pts, 6, modality_ids=mods)
    gen_path = cached_ahead_nll(dec, cp, prompts, targets, table=table)
    torch.testing.assert_close(train_path, gen_path, rtol=1e-5, atol=1e-5)
    # N = 0 (no coprocessor, or one with zero latents): the plain decoder's loss on x_{p+1} .. x_{p+6}
    full = F.cross_entropy(dec(ids, mods)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="none").view(3, 39)
    plain = torch.stack([full[r, p:p + 6] for r, p in zip(rows.tolist(), pts.tolist())])
    for c in (None, Coprocessor(dec.cfg, 0)):
        torch.testing.assert_close(cached_ahead_nll(dec, c, prompts, targets, table=table), plain, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(ahead_nll(dec, c, ids, rows, pts, 6, modality_ids=mods), plain,
                                       rtol=1e-5, atol=1e-5)
    # the latents change what the decoder predicts
    assert (train_path - plain).abs().max() > 1e-3


def test_augment_appends_latents_at_each_rows_length():
    from mmfm.cacheaug import prefill

    dec = _model()
    cp = Coprocessor.from_decoder(dec, 4)
    prompts = [torch.randint(0, 50, (n,)) for n in (3, 9, 6)]
    nxt = torch.randint(0, 50, (3, 1))
    cache = KVCache.for_model(dec, 3, 9 + 4 + 1)
    prefill(dec, prompts, cache)
    before_k = cache.k.clone()
    assert augment(dec, cp, cache) == 4 and cache.lengths.tolist() == [7, 13, 10]
    for b, n in enumerate((3, 9, 6)):   # the prefix entries are untouched; latents follow them
        assert torch.equal(cache.k[:, b, :, :n], before_k[:, b, :, :n])
    logits = dec(nxt, cache=cache)[:, -1]
    for b, n in enumerate((3, 9, 6)):   # each row as if alone
        one = KVCache.for_model(dec, 1, n + 5)
        prefill(dec, [prompts[b]], one)
        augment(dec, cp, one)
        torch.testing.assert_close(dec(nxt[b:b + 1], cache=one)[0, -1], logits[b], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="free slots"):
        augment(dec, cp, cache)
    assert augment(dec, None, cache) == 0


def test_generate_without_coprocessor_is_plain_greedy_decoding():
    dec = _model()
    prompts = [torch.randint(0, 50, (n,)) for n in (4, 7)]
    got = generate(dec, prompts, 6)
    for p, g in zip(prompts, got):
        seq = p.clone()
        for _ in range(6):
            seq = torch.cat([seq, dec(seq[None])[0, -1].argmax()[None]])
        assert torch.equal(g, seq[p.numel():])
    torch.manual_seed(1)             # large weights: a latent or token at a wrong position changes the argmax
    dec = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=50,
                                  max_seq_len=128, init_std=0.5)).eval()
    cp = Coprocessor.from_decoder(dec, 3)
    aug = generate(dec, prompts, 3, coprocessor=cp, every=2)     # at the prompt's end, and before token 2 is fed
    from mmfm.cacheaug import prefill

    for p, g in zip(prompts, aug):   # the same schedule by hand: tokens at their own positions, latents at theirs
        n = p.numel()
        cache = KVCache.for_model(dec, 1, n + 3 + 6)
        prefill(dec, [p[:-1]], cache)
        augment(dec, cp, cache)
        two = dec(torch.stack([p[-1], g[0]])[None], cache=cache, positions=torch.tensor([[n - 1, n]]))[0]
        augment(dec, cp, cache, torch.tensor([n + 1]))
        last = dec(g[1:2][None], cache=cache, positions=torch.tensor([[n + 1]]))[0, -1]
        assert [int(two[0].argmax()), int(two[1].argmax()), int(last.argmax())] == g.tolist()
    with pytest.raises(ValueError, match="every"):
        generate(dec, prompts, 6, coprocessor=cp, every=-1)


def test_save_load_round_trip(tmp_path):
    dec = _model()
    cp = Coprocessor.from_decoder(dec, 5, seed=3)
    with torch.no_grad():
        cp.soft.add_(0.5)
    save_coprocessor(cp, str(tmp_path / "c"), {"decoder_sha256": weights_hash(dec)})
    back = load_coprocessor(str(tmp_path / "c"), dec)
    assert back.num_latents == 5 and back.meta["decoder_sha256"] == weights_hash(dec)
    for (n, a), (_, b) in zip(cp.state_dict().items(), back.state_dict().items()):
        if not n.startswith("body.embed_tokens"):
            assert torch.equal(a, b), n
    prompts, targets = [torch.randint(0, 50, (8,))], torch.randint(0, 50, (1, 5))
    assert torch.equal(cached_ahead_nll(dec, cp, prompts, targets), cached_ahead_nll(dec, back, prompts, targets))
    other = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=50))
    with pytest.raises(ValueError, match="dim"):
        load_coprocessor(str(tmp_path / "c"), other)
    with pytest.raises(FileNotFoundError, match="coprocessor.json"):
        load_coprocessor(str(tmp_path))


def test_choose_points_respects_validity_and_modalities():
    ids = torch.arange(40).repeat(2, 1)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    table = (torch.arange(40) >= 10).long()             # ids 10.. are group 1
    g = torch.Generator().manual_seed(0)
    rows, pts = choose_points(ids, valid, table, points=50, ahead=5, min_prefix=12, groups=[1], generator=g)
    # x_p .. x_{p+5} must be real tokens of group 1: p in [12, 34] (row 0), [12, 24] (row 1)
    assert rows.tolist().count(0) == 23 and rows.tolist().count(1) == 13
    assert bool((pts >= 12).all()) and bool((pts[rows == 1] + 5 < 30).all())


# ---------------------------------------------------------------- DeepSpeed training, end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny decoder pretrained in-process (5 steps: it still has much to learn, which is where latents
    can help) on synthetic token shards and exported; then 10 steps of `mmfm cacheaug train` (ZeRO-1,
    one process) for an N = 4 coprocessor."""
    from mmfm.export import write_folder
    from mmfm.train.tokens import synthetic_token_corpus, token_dataset
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("cacheaug")
    v = Vocab(64, {"image": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "train"), v, n=160, seed=0)
    synthetic_token_corpus(str(d / "eval"), v, n=40, seed=1, prefix="eval")
    torch.manual_seed(0)
    dec = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=v.size,
                                  max_seq_len=128))
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    ds = token_dataset(str(d / "train"), seq_len=64, batch_size=8, pad_id=v.pad_id, seed=0, shuffle_buffer=16)
    it = iter(ds)
    for _ in range(5):
        b = next(it)
        while "tokens" not in b:
            b = next(it)
        ids = b["tokens"]
        loss = F.cross_entropy(dec(ids)[:, :-1].reshape(-1, v.size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    write_folder(dec.state_dict(), dec.cfg, str(d / "export"), str(d / "vocab.json"))
    # What the exported decoder computes before any coprocessor training, saved to a file: the
    # test compares the decoder after training with these, not with a copy of itself.
    from mmfm.models.io import load

    exported = load(str(d / "export"))
    ids = _heldout_batches(d, v)[0]
    with torch.no_grad():
        torch.save({"ids": ids, "logits": exported(ids),
                    "generated": generate(exported, [ids[0, :10], ids[1, :7]], 5)}, d / "before.pt")
    cfg = d / "aug.yaml"
    cfg.write_text(f"""decoder: {d}/export
deepspeed: {REPO}/configs/deepspeed/zero1.json
coprocessor: {{num_latents: 4}}
data: {{shards: {d}/train, seq_len: 64, shuffle_buffer: 16, points: 4, ahead: 4, min_prefix: 4, modalities: []}}
optim: {{lr: 0.01, warmup_steps: 1, weight_decay: 0.0}}
train: {{out: {d}/out, steps: 10, micro_batch: 4, log_every: 1, checkpoint_every: 5, progress: false}}
""")
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "cacheaug", "train", "--config", str(cfg)], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return d, v


def _heldout_batches(d, v):
    """Every batch of the held-out shards: token ids [8, 64] each."""
    from mmfm.train.tokens import token_dataset

    ds = token_dataset(str(d / "eval"), seq_len=64, batch_size=8, pad_id=v.pad_id, seed=0, shuffle_buffer=0, loop=False)
    return [b["tokens"] for b in ds if "tokens" in b]


def _heldout_points(dec, cps, d, v, A=4):
    """Mean ahead loss per held-out point (several points in each row of every held-out batch)
    for each coprocessor in cps (None: the plain decoder): a tensor [len(cps), points]."""
    from mmfm.train.tokens import token_dataset

    ds = token_dataset(str(d / "eval"), seq_len=64, batch_size=8, pad_id=v.pad_id, seed=0, shuffle_buffer=0, loop=False)
    g = torch.Generator().manual_seed(0)
    out = [[] for _ in cps]
    for b in ds:
        if "tokens" not in b:
            continue
        ids, valid = b["tokens"], b["segment_ids"] >= 0
        rows, pts = choose_points(ids, valid, torch.zeros(v.size, dtype=torch.long), points=6, ahead=A, min_prefix=4,
                                  groups=None, generator=g)
        with torch.no_grad():
            for o, cp in zip(out, cps):
                o.append(ahead_nll(dec, cp, ids, rows, pts, A).mean(1))
    return torch.stack([torch.cat(o) for o in out])


def _lower_bound(diff, z=3.0):
    """Mean of paired differences minus z standard errors (z = 3: one-sided ~0.1%)."""
    return float(diff.mean() - z * diff.std() / diff.numel() ** 0.5)


def test_training_lowers_ahead_loss_and_leaves_decoder_unchanged(trained):
    from mmfm.models.io import load

    d, v = trained
    summary = json.load(open(d / "out" / "summary.json"))
    dec = load(str(d / "export"))
    assert summary["decoder_sha256_before"] == summary["decoder_sha256_after"] == weights_hash(dec)
    assert sorted(int(k) for k in summary["gains"]) == list(range(1, 11))    # plain - augmented, logged per step
    assert os.path.exists(d / "out" / "checkpoints" / "latest")
    trained_cp = load_coprocessor(str(d / "out" / "coprocessor"), dec)
    init_cp = Coprocessor.from_decoder(dec, 4, seed=0)
    assert not torch.equal(trained_cp.soft, init_cp.soft)      # it trained
    # held-out, point by point: the trained coprocessor's loss is lower than the initial one's and
    # than the plain decoder's, by a mean gain whose 3-standard-error lower bound is above zero
    # (the gain after 10 steps is small, so one seeded run's mean alone would prove little)
    plain, before, after = _heldout_points(dec, [None, init_cp, trained_cp], d, v)
    assert plain.numel() >= 90
    gains = {"initial": before - after, "plain": plain - after}
    assert all(_lower_bound(g) > 0 for g in gains.values()), \
        {k: (float(g.mean()), float(g.std() / g.numel() ** 0.5)) for k, g in gains.items()}
    # the decoder alone still computes, bit for bit, what it computed before `cacheaug train` ran
    saved = torch.load(d / "before.pt")
    with torch.no_grad():
        assert torch.equal(dec(saved["ids"]), saved["logits"])
    ids = saved["ids"]
    got = generate(dec, [ids[0, :10], ids[1, :7]], 5)
    assert all(torch.equal(a, b) for a, b in zip(got, saved["generated"]))


def test_eval_records(trained, tmp_path):
    from mmfm.cacheaug.evaluate import evaluate

    d, v = trained
    rec = evaluate(str(d / "export"), [str(d / "out" / "coprocessor")], str(d / "eval"), ahead=4, points=2,
                   min_prefix=4, max_rows=40)
    assert {r["bench"] for r in rec} == {"cacheaug"} and {r["impl"] for r in rec} == {"decoder", "mmfm"}
    by = {(r["case"]["latents"], r["case"]["data"], r["impl"]): r["ppl"] for r in rec}
    assert by[(0, "all", "mmfm")] == pytest.approx(by[(0, "all", "decoder")], rel=1e-6)
    assert by[(4, "all", "decoder")] == by[(0, "all", "decoder")]
    assert by[(4, "all", "mmfm")] != pytest.approx(by[(4, "all", "decoder")], rel=1e-4)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, field", [
    ("coprocessor: {num_latents: 0}", "coprocessor.num_latents"),
    ("coprocessor: {num_latnts: 4}", "coprocessor.num_latnts"),
    ("data: {ahead: two}", "data.ahead"),
    ("train: {precision: bf16}", "train.precision"),
    ("data: {seq_len: 8, min_prefix: 8, ahead: 8}", "data.seq_len"),
    ("bogus: 1", "bogus"),
])
def test_config_errors_name_the_field(tmp_path, text, field):
    body = f"decoder: x\ndeepspeed: {REPO}/configs/deepspeed/zero0.json\n"
    if not text.startswith("data:"):
        body += "data: {shards: s}\n"
    else:
        text = text[:-1] + ", shards: s}"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_aug_config(_write(tmp_path, body + text))


def test_config_decoder_and_overrides(tmp_path):
    path = _write(tmp_path, f"deepspeed: {REPO}/configs/deepspeed/zero0.json\ndata: {{shards: s}}\n")
    with pytest.raises(ConfigError, match="decoder"):
        load_aug_config(path)
    cfg = load_aug_config(path, ["coprocessor.num_latents=4", "train.steps=3"], decoder="dec")
    assert cfg.decoder == "dec" and cfg.coprocessor.num_latents == 4 and cfg.train.steps == 3
    with pytest.raises(ConfigError, match="override"):
        load_aug_config(path, ["model.dim=4"], decoder="dec")
    cfg = load_aug_config(str(os.path.join(REPO, "configs/cacheaug/demo.yaml")))
    assert cfg.coprocessor.num_latents == 16
