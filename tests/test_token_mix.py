"""The training token stream of a pretrain config (mmfm/train/tokens.py): per-modality mix, packing
that keeps a caption with its modality, caption dropout; each exact on resume. Real token shards
written and read back through ShardDataset / ShardLoader."""
import numpy as np
import pytest

from mmfm.data.dataset import ShardLoader
from mmfm.train.config import DataSection
from mmfm.train.tokens import caption_dropout, train_token_dataset, write_token_shards
from mmfm.typed_config import ConfigError
from mmfm.vocab import Vocab

# natural shares 0.75 / 0.19 / 0.06: far from the weights the tests ask for
COUNTS = {"text": 240, "image": 60, "video": 20}
VOCAB = Vocab(50, {"image": 40, "video": 30})
META = {"text": {}, "image": {"width": 32, "height": 32},
        "video": {"fps": 8, "num_frames": 9, "width": 32, "height": 32}}


def sample_ids(modality: str, i: int, rng) -> np.ndarray:
    """A text document, or <caption> then the modality's tokens (as mmfm demo writes them)."""
    cap = rng.integers(0, 50, int(rng.integers(3, 9)))
    if modality == "text":
        return VOCAB.encode_sample([("text", rng.integers(0, 50, int(rng.integers(10, 60))))])[0].numpy()
    body = rng.integers(0, VOCAB.ranges[modality].size, 20 if modality == "image" else 12)
    return VOCAB.encode_sample([("text", cap), (modality, body)])[0].numpy()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    items = [(f"{m}{i:04d}", sample_ids(m, i, rng), {"modality": m, "source": "test", "license": "CC0-1.0", **META[m]})
             for m, n in COUNTS.items() for i in range(n)]
    order = rng.permutation(len(items))   # modalities share shards, as in the demo's token shards
    write_token_shards((items[k] for k in order), str(d), prefix="train", shard_size=100)
    return str(d / "train-*.tar")


def data(shards, **kw) -> DataSection:
    return DataSection(shards=shards, seq_len=64, shuffle_buffer=16, **kw)


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def drawn_keys(bs) -> list[str]:
    """Keys of the samples that start in these rows (a split sample's tail repeats its key)."""
    keys = []
    for b in bs:
        for row, seg, ks in zip(b["tokens"].numpy(), b["segment_ids"].numpy(), b["__key__"]):
            for s, k in enumerate(ks):
                if row[seg == s][0] == VOCAB.bos_id:
                    keys.append(k)
    return keys


@pytest.mark.parametrize("seed", [0, 1])
def test_realised_mix_matches_the_weights(shards, seed):
    mix = {"text": 0.2, "image": 0.5, "video": 0.3}
    loader = ShardLoader(train_token_dataset(data(shards, mix=mix), VOCAB, batch_size=8, seed=seed))
    keys = drawn_keys(batches(loader, 120))
    n = len(keys)
    assert n > 1500
    for m, w in mix.items():
        share = sum(k.startswith(m) for k in keys) / n
        assert abs(share - w) < 0.03, (m, share, w)   # binomial sd ~0.01; the natural shares are 0.75/0.19/0.06
    # every sample of the small modality is drawn, many times over (it is repeated, not exhausted)
    videos = {k for k in keys if k.startswith("video")}
    assert len(videos) == COUNTS["video"]


def test_a_modality_left_out_of_the_mix_is_not_drawn(shards):
    loader = ShardLoader(train_token_dataset(data(shards, mix={"image": 1.0}), VOCAB, batch_size=4, seed=0))
    assert {k[:5] for k in drawn_keys(batches(loader, 30))} == {"image"}


@pytest.mark.parametrize("kw", [dict(mix={"text": 0.2, "image": 0.5, "video": 0.3}, pack="whole", caption_dropout=0.3),
                                dict(pack="whole"), dict(caption_dropout=0.5)])
def test_resume_continues_exactly(shards, kw):
    def loader():
        return ShardLoader(train_token_dataset(data(shards, **kw), VOCAB, batch_size=4, seed=3))

    full = batches(loader(), 40)
    first = loader()
    it = iter(first)
    for _ in range(15):
        next(it)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = batches(resumed, 25)
    for a, b in zip(full[15:], rest):
        assert np.array_equal(a["tokens"].numpy(), b["tokens"].numpy())
        assert a["__key__"] == b["__key__"]


def test_whole_packing_keeps_every_caption_with_its_modality(shards):
    """The defect this guards: with "concat" packing a row boundary falls inside ~1 in 5 demo image
    samples, and the image tokens past it are trained without their caption."""
    def orphans(pack):
        loader = ShardLoader(train_token_dataset(data(shards, pack=pack), VOCAB, batch_size=8, seed=0))
        n = 0
        for b in batches(loader, 40):
            for row, seg in zip(b["tokens"].numpy(), b["segment_ids"].numpy()):
                for s in np.unique(seg[seg >= 0]):
                    piece = row[seg == s]
                    has_mod = any(VOCAB.ranges[m].start <= t < VOCAB.ranges[m].stop
                                  for t in piece for m in ("image", "video"))
                    n += bool(has_mod and piece[0] != VOCAB.bos_id)   # modality tokens whose caption is elsewhere
        return n

    assert orphans("concat") > 10          # the old packing does split them
    assert orphans("whole") == 0


def test_whole_packing_cuts_only_samples_longer_than_a_row(tmp_path):
    rng = np.random.default_rng(1)
    items = [(f"s{i:03d}", VOCAB.encode_sample([("text", rng.integers(0, 50, n))])[0].numpy(),
              {"modality": "text", "source": "t", "license": "CC0-1.0"}) for i, n in enumerate([150] + [20] * 30)]
    write_token_shards(items, str(tmp_path), prefix="train", shard_size=100)
    d = DataSection(shards=str(tmp_path / "train-*.tar"), seq_len=64, shuffle_buffer=0, pack="whole")
    ds = train_token_dataset(d, VOCAB, batch_size=1, seed=0)
    ds.loop = False
    rows = [b for b in ShardLoader(ds) if "tokens" in b]
    pieces = {}
    for b in rows:
        for s, k in enumerate(b["__key__"][0]):
            pieces.setdefault(k, []).append(int((b["segment_ids"][0] == s).sum()))
    assert pieces["s000"] == [64, 64, 26]                       # 154 tokens: cut at row starts
    assert all(v == [24] for k, v in pieces.items() if k != "s000")   # the rest whole
    assert sum(len(v) for v in pieces.values()) == 33


def test_caption_dropout_rate_form_and_scope():
    p, n = 0.25, 4000
    hook = caption_dropout(VOCAB, p, seed=0)
    rng = np.random.default_rng(0)
    img = sample_ids("image", 0, rng)
    doc = sample_ids("text", 0, rng)
    outs = [hook({"npy": img, "__draw__": (0, i)}) for i in range(n)]
    dropped = [o for o in outs if len(o) < len(img)]
    assert abs(len(dropped) / n - p) < 0.03
    # the dropped form is the unconditional prompt of classifier-free guidance, then the image as it was
    from mmfm.generate.prompt import unconditional_prompt

    uncond = unconditional_prompt(VOCAB, "image").numpy()
    e = int(np.flatnonzero(img == VOCAB.end_id("text"))[0])
    assert all(np.array_equal(o, np.concatenate([uncond, img[e + 2:]])) for o in dropped)
    assert all(np.array_equal(hook({"npy": doc, "__draw__": (0, i)}), doc) for i in range(200))  # documents kept
    # the same draw decides the same way (what exact resume needs)
    again = [hook({"npy": img, "__draw__": (0, i)}) for i in range(n)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    with pytest.raises(ValueError, match="caption_dropout"):
        caption_dropout(VOCAB, 1.0, seed=0)


def test_a_mix_naming_an_absent_modality_stops_and_names_it(shards):
    with pytest.raises(ConfigError, match=r"data\.mix\.audio: no samples of modality 'audio'"):
        train_token_dataset(data(shards, mix={"image": 1.0, "audio": 0.5}), VOCAB, batch_size=4, seed=0)


def test_pretrain_config_reads_mix_dropout_pack_and_loss_weights(tmp_path):
    from mmfm.train.config import load_run_config

    cfg = load_run_config("configs/pretrain/demo.yaml", ["data.mix={image: 0.7, text: 0.3}", "data.caption_dropout=0.1",
                                                         "objective.loss_weights={text: 0.5}"])
    assert cfg.data.mix == {"image": 0.7, "text": 0.3} and cfg.data.caption_dropout == 0.1
    assert cfg.objective.loss_weights == {"text": 0.5}
    for bad, field in [("data.mix={image: -1}", "data.mix"), ("data.mix={image: x}", "data.mix.image"),
                       ("data.pack=split", "data.pack"), ("data.caption_dropout=1.5", "data.caption_dropout"),
                       ("objective.loss_weights=[1]", "objective.loss_weights")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_run_config("configs/pretrain/demo.yaml", [bad])


def test_document_mask_keeps_each_packed_sample_to_itself():
    """With objective.document_mask a sample's logits do not depend on the sample packed before it
    (as at generation, where a prompt starts the context); without it they do."""
    import torch

    from mmfm.models import Transformer
    from mmfm.models.config import ModelConfig
    from mmfm.objectives import ObjectiveConfig, build_objective

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128,
                                    vocab_size=VOCAB.size)).eval()
    rng = np.random.default_rng(0)
    a, b, a2 = sample_ids("image", 0, rng), sample_ids("image", 1, rng), sample_ids("video", 2, rng)
    table = VOCAB.modality_table()

    def logits_of_b(first, doc_mask):
        ids = torch.tensor(np.concatenate([first, b]))[None]
        p = build_objective(ObjectiveConfig(kind="ar", document_mask=doc_mask), VOCAB).prepare(
            ids, table[ids], torch.ones_like(ids, dtype=torch.bool))
        with torch.no_grad():
            return model(p.input_ids, p.modality_ids, p.attn_mask, doc_ids=p.doc_ids)[0, len(first):]

    assert torch.allclose(logits_of_b(a, True), logits_of_b(a2, True), atol=1e-5)
    assert not torch.allclose(logits_of_b(a, False), logits_of_b(a2, False), atol=1e-3)
