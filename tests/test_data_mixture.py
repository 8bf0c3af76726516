"""Mixtures over several token shard sets (data.sources, data.source_weights, data.mix;
mmfm/train/tokens.py: mixture_sources): per-modality and per-source shares as configured,
epoch-free (resampled) streaming, exact resume, and the realised per-source mix in the step's log
metrics. Real token shards written and read back through ShardDataset / ShardLoader."""
import numpy as np
import pytest
import torch

from mmfm.data.dataset import ShardLoader
from mmfm.train.config import DataSection, load_run_config
from mmfm.train.tokens import mixture_sources, source_names, train_token_dataset, write_token_shards
from mmfm.typed_config import ConfigError
from test_token_mix import META, VOCAB, sample_ids

SETS = {"web": {"text": 150, "image": 30}, "books": {"image": 60, "video": 30}}


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    out = {}
    for s, counts in SETS.items():
        d = tmp_path_factory.mktemp(s)
        rng = np.random.default_rng(len(s))
        items = [(f"{s}-{m}{i:04d}", sample_ids(m, i, rng), {"modality": m, "source": s, "license": "CC0-1.0", **META[m]})
                 for m, n in counts.items() for i in range(n)]
        write_token_shards((items[k] for k in rng.permutation(len(items))), str(d), prefix="t", shard_size=40)
        out[s] = str(d / "t-*.tar")
    return out


def starts(bs):
    """(key, source index) of every sample that starts in these rows."""
    got = []
    for b in bs:
        for row, seg, src, ks in zip(b["tokens"].numpy(), b["segment_ids"].numpy(), b["source_ids"].numpy(), b["__key__"]):
            for s, k in enumerate(ks):
                if row[seg == s][0] == VOCAB.bos_id:
                    assert len(set(src[seg == s])) == 1
                    got.append((k, int(src[seg == s][0])))
    return got


def loader_of(shard_sets, seed=0, **kw):
    d = DataSection(sources=shard_sets, seq_len=64, shuffle_buffer=16, **kw)
    ds = train_token_dataset(d, VOCAB, batch_size=8, seed=seed)
    return ShardLoader(ds), ds


@pytest.mark.parametrize("seed", [0, 1])
def test_modality_and_source_shares_follow_the_weights(shard_sets, seed):
    mix, w = {"text": 0.3, "image": 0.5, "video": 0.2}, {"web": 1.0, "books": 3.0}
    loader, ds = loader_of(shard_sets, seed, mix=mix, source_weights=w)
    it = iter(loader)
    got = starts([next(it) for _ in range(60)])
    n = len(got)
    assert n > 700
    # image's 0.5 split web:books = 1:3; text only in web, video only in books
    want = {("web", "text"): 0.3, ("web", "image"): 0.125, ("books", "image"): 0.375, ("books", "video"): 0.2}
    for (s, m), share in want.items():
        real = sum(k.startswith(f"{s}-{m}") for k, _ in got) / n
        assert abs(real - share) < 0.05, (s, m, real, share)   # binomial sd <= 0.018; natural: 0.56, 0.11, 0.22, 0.11
    names = source_names(ds)
    assert all(names[i] == k.split("-")[0] for k, i in got)      # source_ids name the set each sample came from


def test_sources_without_mix_draw_by_source_weight(shard_sets):
    loader, _ = loader_of(shard_sets, source_weights={"books": 3.0})
    it = iter(loader)
    got = starts([next(it) for _ in range(50)])
    books = sum(k.startswith("books") for k, _ in got) / len(got)
    assert abs(books - 0.75) < 0.05, books                          # natural: 90 of 270 samples = 0.33


def test_mixture_sources_split_each_modality_over_the_sets_holding_it():
    have = {"a": {"image": 5, "text": 9}, "b": {"image": 1}}
    src = {s.name: s.weight for s in mixture_sources({"a": "x", "b": "y"}, {"a": 1, "b": 4}, {"image": 2, "text": 2}, have)}
    assert src == pytest.approx({"a/image": 0.1, "b/image": 0.4, "a/text": 0.5})
    with pytest.raises(ValueError, match="mix.video"):
        mixture_sources({"a": "x"}, None, {"video": 1}, have)


@pytest.mark.parametrize("kw", [{"mix": {"image": 0.6, "text": 0.4}, "source_weights": {"web": 2.0}}, {}])
def test_mixture_resumes_exactly(shard_sets, kw):
    loader, _ = loader_of(shard_sets, 3, pack="whole", **kw)
    it = iter(loader)
    [next(it) for _ in range(4)]
    state = loader.state_dict()
    want = [next(it) for _ in range(4)]
    resumed, _ = loader_of(shard_sets, 3, pack="whole", **kw)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for a, b in zip(want, [next(it2) for _ in range(4)]):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["source_ids"], b["source_ids"])
        assert a["__key__"] == b["__key__"]


def test_resampled_single_set_streams_past_an_epoch(shard_sets):
    """data.resampled: one shard set read epoch-free; more rows than the set holds, no trailer."""
    d = DataSection(shards=shard_sets["books"], seq_len=64, shuffle_buffer=8, resampled=True)
    it = iter(ShardLoader(train_token_dataset(d, VOCAB, batch_size=8, seed=0)))
    bs = [next(it) for _ in range(30)]        # 240 rows of 64 > the set's ~90 samples x ~25 tokens
    assert all("tokens" in b for b in bs)


def test_realised_source_mix_is_logged(shard_sets):
    from mmfm.objectives import ObjectiveConfig, build_objective
    from mmfm.train.loop import ObjectiveStep

    loader, ds = loader_of(shard_sets, source_weights={"books": 3.0})
    step = ObjectiveStep(build_objective(ObjectiveConfig(), VOCAB), VOCAB.modality_table(), VOCAB.modality_names,
                         64, 1.0, source_names=source_names(ds))
    batch = next(iter(loader))
    prep = step.prepare(batch, torch.Generator())
    G = len(VOCAB.modality_names)
    row = step.metrics(prep, 1.0, torch.ones(2 * G, dtype=torch.float64))
    valid = batch["source_ids"] >= 0
    books = float((batch["source_ids"][valid] == source_names(ds).index("books")).double().mean())
    assert row["mix_source_books"] == pytest.approx(books) and row["mix_source_web"] == pytest.approx(1 - books)


def test_source_fields_are_checked(tmp_path):
    for bad, field in [("data.sources={a: x}", "data.sources"),              # demo.yaml also sets data.shards
                       ("data.source_weights={a: 1}", "data.source_weights"),
                       ("data.source_weights={a: -1}", "data.source_weights")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_run_config("configs/pretrain/demo.yaml", [bad])
    cfg = load_run_config("configs/pretrain/demo.yaml", ["data.shards=''", "data.sources={a: x, b: y}",
                                                         "data.source_weights={b: 2}", "data.resampled=true"])
    assert cfg.data.sources == {"a": "x", "b": "y"} and cfg.data.source_weights == {"b": 2.0}
