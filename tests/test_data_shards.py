"""Shard writing, building and verifying: round trip per modality, plain tar and plain
webdataset can read the shards, unsafe names are refused, corrupt members are reported."""
import io
import json
import os
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

from mmfm.data.build import build_shards
from mmfm.data.codecs import decode_field
from mmfm.data.schema import MODALITIES, SchemaError, check_key, is_safe_member_name, safe_join
from mmfm.data.synthetic import synthetic_sample
from mmfm.data.verify import verify_shards
from mmfm.data.writer import SampleShardWriter


def assert_same(field, written, read):
    if field == "json":
        assert read == written
    elif field == "txt":
        assert read == written
    elif field == "wav":
        audio, rate = read
        assert np.abs(audio[:, 0] - written).max() <= 1 / 32767 + 1e-6  # 16-bit PCM
    elif isinstance(written, dict):
        assert set(read) == set(written)
        for k in written:
            np.testing.assert_array_equal(read[k], written[k])
    else:
        np.testing.assert_array_equal(read, written)


@pytest.mark.parametrize("modality", MODALITIES)
def test_round_trip_each_modality(tmp_path, modality):
    samples = [synthetic_sample(modality, i, size=8) for i in range(5)]
    with SampleShardWriter(str(tmp_path), prefix=modality, shard_size=2) as w:
        for s in samples:
            w.write(s)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar"))
    assert shards == [f"{modality}-00000{i}.tar" for i in range(3)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert w.manifest["samples"] == 5 and w.manifest["modalities"] == {modality: 5}

    # plain webdataset, no mmfm code on the read side
    urls = [str(tmp_path / s) for s in shards]
    read = list(wds.WebDataset(urls, shardshuffle=False))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    for s, r in zip(samples, read):
        for field, value in s.items():
            if not field.startswith("__"):
                assert_same(field, value, decode_field(field, r[field]))

    # plain tar
    listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert f"{samples[0]['__key__']}.json" in listing
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", urls[0], "-C", str(dest)], check=True)
    assert json.loads((dest / f"{samples[0]['__key__']}.json").read_text())["modality"] == modality

    report = verify_shards(str(tmp_path), progress=False)
    assert report.ok and report.samples == 5 and report.per_modality[modality]["samples"] == 5


def test_shards_are_reproducible(tmp_path):
    for d in ("a", "b"):
        with SampleShardWriter(str(tmp_path / d), prefix="img") as w:
            for i in range(3):
                w.write(synthetic_sample("image", i, 8))
    assert (tmp_path / "a" / "img-000000.tar").read_bytes() == (tmp_path / "b" / "img-000000.tar").read_bytes()


@pytest.mark.parametrize("key", ["../evil", "/etc/passwd", "a/../../b", "a.b", "", "C:/x", "a//b", "./a"])
def test_writer_refuses_unsafe_keys(tmp_path, key):
    sample = synthetic_sample("text", 0)
    sample["__key__"] = key
    with SampleShardWriter(str(tmp_path / "out"), prefix="t") as w:
        with pytest.raises(SchemaError):
            w.write(sample)
        w.write(synthetic_sample("text", 1))  # the writer is still usable afterwards
    names = tarfile.open(tmp_path / "out" / "t-000000.tar").getnames()
    assert names == ["text_000001.json", "text_000001.txt"]
    assert not (tmp_path / "evil.txt").exists()


def test_safe_join_and_member_names(tmp_path):
    assert check_key("dir/sub_1/key-2") == "dir/sub_1/key-2"
    assert is_safe_member_name("a/b.png") and not is_safe_member_name("../a.png")
    assert not is_safe_member_name("/abs.png") and not is_safe_member_name("a/../../b.png")
    assert safe_join(str(tmp_path), "a/b.png") == os.path.join(os.path.realpath(tmp_path), "a", "b.png")
    for bad in ("../x.png", "/x.png", "a/../../x.png"):
        with pytest.raises(SchemaError):
            safe_join(str(tmp_path), bad)


def test_writer_checks_metadata_and_values(tmp_path):
    with SampleShardWriter(str(tmp_path), prefix="p") as w:
        s = synthetic_sample("physics", 0)
        del s["json"]["grid_spacing"]
        with pytest.raises(SchemaError, match="grid_spacing"):
            w.write(s)
        s = synthetic_sample("physics", 1)
        s["npz"]["fields"][0, 0, 0, 0] = np.nan
        with pytest.raises(SchemaError, match="NaN"):
            w.write(s)
        s = synthetic_sample("image", 2)
        s["json"]["width"] = 99
        with pytest.raises(SchemaError, match="shape"):
            w.write(s)
        w.write(synthetic_sample("image", 3))
    assert w.manifest["samples"] == 1


def test_failed_build_publishes_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with SampleShardWriter(str(tmp_path), prefix="t", shard_size=10) as w:
            w.write(synthetic_sample("text", 0))
            raise RuntimeError("crash mid-shard")
    assert os.listdir(tmp_path) == []


def _make_source_folder(root):
    from PIL import Image

    root.mkdir()
    Image.fromarray(np.full((6, 5, 3), 200, np.uint8)).save(root / "red.png")
    (root / "red.txt").write_text("a light square")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "dark.jpg")
    (root / "dark.json").write_text(json.dumps({"license": "CC0-1.0"}))
    (root / "notes.md").write_text("not an image, ignored")


def test_build_from_folder_and_verify_cli(tmp_path, capsys):
    from mmfm.cli import main

    _make_source_folder(tmp_path / "src")
    out = tmp_path / "shards"
    assert main(["data", "build", "--modality", "image", "--src", str(tmp_path / "src"), "--out", str(out),
                 "--shard-size", "1", "--quiet"]) == 0
    assert "wrote 2 image samples in 2 shards" in capsys.readouterr().out
    read = {r["__key__"]: r for r in wds.WebDataset(str(out / "image-{000000..000001}.tar"), shardshuffle=False)}
    assert json.loads(read["dark"]["json"])["license"] == "CC0-1.0"
    assert read["red"]["txt"] == b"a light square"
    assert read["red"]["png"] == (tmp_path / "src" / "red.png").read_bytes()  # stored as given
    assert main(["data", "verify", str(out), "--quiet"]) == 0
    assert "image" in capsys.readouterr().out


def test_build_from_jsonl_rejects_unsafe_keys(tmp_path, capsys):
    from mmfm.cli import main

    (tmp_path / "a.txt").write_text("hello world")
    lines = [{"key": "good", "files": {"txt": "a.txt"}, "meta": {"license": "CC0-1.0"}},
             {"key": "../escape", "text": "x"}, {"key": "/abs", "text": "y"}, {"key": "inline", "text": "inline doc"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    rc = main(["data", "build", "--modality", "text", "--src", str(tmp_path / "m.jsonl"), "--out",
               str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "wrote 2 text samples" in out and "../escape" in out and "/abs" in out
    names = tarfile.open(tmp_path / "out" / "text-000000.tar").getnames()
    assert sorted(names) == ["good.json", "good.txt", "inline.json", "inline.txt"]
    assert not (tmp_path / "escape.txt").exists()


def _tar_with(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def test_verify_lists_corrupt_members(tmp_path, capsys):
    from mmfm.cli import main

    good = synthetic_sample("image", 0)
    with SampleShardWriter(str(tmp_path), prefix="ok") as w:
        w.write(good)
    meta = json.dumps({"modality": "image", "source": "t", "license": "t", "width": 4, "height": 4}).encode()
    _tar_with(tmp_path / "bad.tar", [("broken.json", meta), ("broken.png", b"\x89PNG not really"),
                                     ("../escape.txt", b"x")])
    rc = main(["data", "verify", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "broken" in out and "corrupt_sample" in out and "unsafe_member" in out and "../escape.txt" in out
    report = verify_shards(str(tmp_path), progress=False)
    assert report.samples == 1 and len(report.problems) == 2
