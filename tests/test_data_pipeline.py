"""The reader pipeline: order and coverage across ranks and workers, exact resume in a new
process, mixtures, shard specs, and every kind of bad data."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from mmfm.data.baddata import BadDataPolicy, BadDataThresholdExceeded
from mmfm.data.codecs import encode_field
from mmfm.data.dataset import ShardDataset, ShardLoader, Source
from mmfm.data.pipeline import utf8_byte_tokens
from mmfm.data.synthetic import synthetic_sample
from mmfm.data.writer import SampleShardWriter

HERE = os.path.dirname(os.path.abspath(__file__))


def write_shards(folder, modality="text", n=42, shard_size=7, size=4, prefix=None):
    with SampleShardWriter(str(folder), prefix=prefix or modality, shard_size=shard_size) as w:
        for i in range(n):
            w.write(synthetic_sample(modality, i, size))
    return [s["__key__"] for s in (synthetic_sample(modality, i, size) for i in range(n))]


def all_keys(loader):
    return [k for b in loader for k in b["__key__"]]


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    keys = write_shards(d)
    return d, keys


def test_epoch_covers_every_sample_once_and_reshuffles(text_shards):
    d, keys = text_shards
    loader = ShardLoader(ShardDataset(str(d), seed=5, shuffle_buffer=8, batch_size=4), num_workers=2)
    first = all_keys(loader)
    second = all_keys(loader)  # the next pass is the next epoch: same samples, other order
    assert sorted(first) == sorted(keys) == sorted(second)
    assert first != second
    again = all_keys(ShardLoader(ShardDataset(str(d), seed=5, shuffle_buffer=8, batch_size=4), num_workers=2))
    assert again == first  # deterministic given the seed


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_by_two_workers_disjoint_and_complete(text_shards, num_workers):
    d, keys = text_shards
    seen = []
    for rank in range(2):
        ds = ShardDataset(str(d), seed=1, shuffle_buffer=4, rank=rank, world_size=2)
        loader = ShardLoader(ds, num_workers=num_workers)
        seen.append(all_keys(loader))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(keys)


def test_rank_and_world_size_from_environment(text_shards, monkeypatch):
    d, keys = text_shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = ShardDataset(str(d))
    assert (ds.rank, ds.world_size) == (1, 2)
    assert 0 < len(all_keys(ShardLoader(ds))) < len(keys)


def run_script(tmp_path, name, cfg, n, state_in=None, state_out=None):
    cfg_path, out = tmp_path / f"{name}.cfg.json", tmp_path / f"{name}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    args = [sys.executable, os.path.join(HERE, "data_resume_run.py"), str(cfg_path), str(out), str(n)]
    args += ["--state-in", str(state_in)] if state_in else []
    args += ["--state-out", str(state_out)] if state_out else []
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("packing", [True, False], ids=["packed_looping", "samples_one_epoch"])
def test_resume_in_new_process_matches_uninterrupted_run(text_shards, tmp_path, packing):
    d, keys = text_shards
    cfg = {"shards": str(d), "seed": 3, "shuffle_buffer": 5, "batch_size": 2, "num_workers": 2}
    if packing:  # ~15 batches an epoch: 30 batches cross an epoch boundary, packer carry included
        cfg.update(tokenize=True, seq_len=32, loop=True)
        total, cut = 30, 11
    else:
        total, cut = 22, 8  # 2 workers x 21 samples: 11 batches each, the last one short
    full = run_script(tmp_path, "full", cfg, total)
    state = tmp_path / "state.json"
    part1 = run_script(tmp_path, "part1", cfg, cut, state_out=state)
    saved = json.loads(state.read_text())
    assert saved["batches"] == cut and set(saved["workers"]) == {"0", "1"} and saved["shard_order"]
    part2 = run_script(tmp_path, "part2", cfg, total - cut, state_in=state)
    assert part1["keys"] + part2["keys"] == full["keys"]
    assert part1["tokens"] + part2["tokens"] == full["tokens"]
    if not packing:
        assert sorted(k for b in full["keys"] for k in b) == sorted(keys)


def test_resume_refuses_a_different_layout(text_shards):
    d, _ = text_shards
    loader = ShardLoader(ShardDataset(str(d), seed=3), num_workers=0)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(ShardDataset(str(d), seed=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        ShardLoader(ShardDataset(str(d), seed=3), num_workers=2).load_state_dict(state)


def test_packing_cuts_fixed_length_sequences(text_shards):
    d, keys = text_shards
    loader = ShardLoader(ShardDataset(str(d), tokenize=utf8_byte_tokens, seq_len=16, batch_size=3, shuffle_shards=False))
    batches = list(loader)
    assert all(b["tokens"].shape[1] == 16 for b in batches)
    total = sum(int((b["segment_ids"] >= 0).sum()) for b in batches)
    assert total == sum(len(synthetic_sample("text", i, 4)["txt"].encode()) for i in range(len(keys)))
    first = synthetic_sample("text", 0, 4)["txt"].encode()
    assert bytes(batches[0]["tokens"][0, :min(16, len(first))].tolist()) == first[:16]


def test_mixture_follows_weights(tmp_path):
    write_shards(tmp_path / "a", "text", n=30, shard_size=10)
    write_shards(tmp_path / "b", "image", n=30, shard_size=10, size=4)
    ds = ShardDataset([Source(str(tmp_path / "a"), 3.0, "text"), Source(str(tmp_path / "b"), 1.0, "image")],
                      resampled=True, samples_per_epoch=400, batch_size=50, seed=0)
    keys = all_keys(ShardLoader(ds))
    assert len(keys) == 400
    frac = sum(k.startswith("text") for k in keys) / len(keys)
    assert 0.68 < frac < 0.82


def test_brace_patterns_and_pipe_commands(text_shards):
    d, keys = text_shards
    pattern = str(d / "text-{000000..000005}.tar")
    assert sorted(all_keys(ShardLoader(ShardDataset(pattern)))) == sorted(keys)
    piped = f"pipe:cat {d}/text-{{000000..000001}}.tar"
    assert sorted(all_keys(ShardLoader(ShardDataset(piped)))) == sorted(keys[:14])


# -- bad data ---------------------------------------------------------------------------------
def tar_of(path, samples):
    """A shard written without the writer's checks: samples are (key, {field: bytes})."""
    with tarfile.open(path, "w") as t:
        for key, fields in samples:
            for f, data in fields.items():
                ti = tarfile.TarInfo(f"{key}.{f}" if not key.startswith("!") else key[1:])
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))


def raw(sample):
    meta = sample["json"]
    return sample["__key__"], {f: encode_field(f, v, meta) for f, v in sample.items() if not f.startswith("__")}


def loose_policy():
    return BadDataPolicy(max_bad_fraction=0.9, max_failed_shard_fraction=0.9)


def test_each_kind_of_bad_data_is_skipped_counted_and_summarised(tmp_path, capsys):
    good = [synthetic_sample("physics", i, 4) for i in range(6)]
    nan = synthetic_sample("physics", 10, 4)
    nan["npz"]["fields"][0, 0, 1, 1] = np.nan
    wrong_shape = synthetic_sample("physics", 11, 4)
    wrong_shape["npz"]["fields"] = wrong_shape["npz"]["fields"][:, :, :, 0]
    bad_png = raw(synthetic_sample("image", 12, 4))
    bad_png[1]["png"] = bad_png[1]["png"][:40]
    bad_wav = raw(synthetic_sample("audio", 13, 4))
    bad_wav[1]["wav"] = b"RIFF....WAVEfmt garbage"
    tar_of(tmp_path / "a.tar", [raw(good[0]), raw(nan), raw(good[1]), bad_png])
    tar_of(tmp_path / "b.tar", [raw(wrong_shape), raw(good[2]), bad_wav, ("!../escape.txt", {"x": b"x"})])
    tar_of(tmp_path / "c.tar", [raw(g) for g in good[3:]])
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    urls = [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar", "missing.tar")] + ["pipe:exit 3"]
    loader = ShardLoader(ShardDataset(urls, shuffle_shards=False, bad_data=loose_policy(), batch_size=2))
    got = all_keys(loader)
    assert set(got) <= {g["__key__"] for g in good} and {g["__key__"] for g in good[:3]} <= set(got)
    s = loader.bad_data_summary()
    assert s["counts"]["invalid"] == 2 and s["counts"]["undecodable"] == 2
    assert s["counts"]["unsafe_member"] == 1 and s["counts"]["truncated_shard"] == 1
    assert s["counts"]["unopenable_shard"] == 2 and str(tmp_path / "missing.tar") in s["failed_shards"]
    kinds = {(e["kind"], e["key"]) for e in s["entries"]}
    assert ("invalid", nan["__key__"]) in kinds and ("undecodable", bad_png[0]) in kinds
    assert all(e["shard"] for e in s["entries"])
    assert "bad data:" in capsys.readouterr().err  # the end-of-epoch summary


def test_bad_fraction_threshold_stops_and_names_the_shard(tmp_path):
    samples = []
    for i in range(30):
        s = synthetic_sample("physics", i, 4)
        if i % 3 == 0:
            s["npz"]["fields"][:] = np.nan
        samples.append(raw(s))
    tar_of(tmp_path / "rotten.tar", samples)
    ds = ShardDataset(str(tmp_path / "rotten.tar"), bad_data=BadDataPolicy(max_bad_fraction=0.1, min_samples=10))
    with pytest.raises(BadDataThresholdExceeded, match="rotten.tar"):
        all_keys(ShardLoader(ds))
    ds = ShardDataset(str(tmp_path / "rotten.tar"), bad_data=BadDataPolicy(max_bad_fraction=0.5, min_samples=10))
    assert len(all_keys(ShardLoader(ds))) == 20


def test_unopenable_shards_stop_only_past_the_threshold(text_shards, tmp_path):
    d, keys = text_shards
    urls = [str(d / f"text-00000{i}.tar") for i in range(6)] + [str(tmp_path / "gone.tar")]
    assert sorted(all_keys(ShardLoader(ShardDataset(urls)))) == sorted(keys)  # a warning, then the next shard
    urls = [str(tmp_path / f"gone{i}.tar") for i in range(3)] + [str(d / "text-000000.tar")]
    with pytest.raises(BadDataThresholdExceeded, match="gone"):
        all_keys(ShardLoader(ShardDataset(urls, shuffle_shards=False)))
