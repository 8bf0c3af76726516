import json

import pytest
import torch

from mmfm.vocab import Vocab

MODALITIES = {"image": 4096, "audio": 1024, "video": 512, "shape3d": 256, "physics": 1000}


def make_vocab():
    return Vocab(32000, MODALITIES)


def test_ranges_are_contiguous_and_disjoint():
    v = make_vocab()
    ranges = sorted(v.ranges.values(), key=lambda r: r.start)
    assert ranges[0].name == "text" and ranges[0].start == 0
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start  # contiguous, never overlapping
    specials = sorted(v.special_tokens.values())
    assert specials[0] == ranges[-1].stop and specials == list(range(specials[0], v.size))
    for name in ("<pad>", "<bos>", "<eos>", "<mask>"):
        assert name in v.special_tokens
    for m in ["text", *MODALITIES]:
        assert f"<begin_{m}>" in v.special_tokens and f"<end_{m}>" in v.special_tokens


@pytest.mark.parametrize("modality", ["text", *MODALITIES])
def test_every_modality_maps_and_inverts(modality):
    v = make_vocab()
    size = v.ranges[modality].size
    local = torch.tensor([0, 1, size - 1, size // 2])
    g = v.to_global(modality, local)
    assert all(v.modality_of(int(i)) == modality for i in g)
    assert torch.equal(v.to_local(modality, g), local)


def test_modality_table_maps_every_id():
    """table[i] for every id: 0 for the four base specials, i + 1 for the i-th modality's whole
    range and its two markers; the same map as encode_sample's modality ids."""
    v = make_vocab()
    table = v.modality_table()
    assert table.dtype == torch.int64 and table.shape == (v.size,)
    want = torch.full((v.size,), -1, dtype=torch.long)
    for name in ("<pad>", "<bos>", "<eos>", "<mask>"):
        want[v.special_tokens[name]] = 0
    for i, m in enumerate(["text", *MODALITIES], start=1):
        r = v.ranges[m]
        want[r.start:r.stop] = i
        want[v.special_tokens[f"<begin_{m}>"]] = want[v.special_tokens[f"<end_{m}>"]] = i
    assert int(want.min()) == 0   # every id was given a modality above
    assert torch.equal(table, want)
    # the range boundaries one by one (an off-by-one at a start or stop would show here)
    for m, r in v.ranges.items():
        assert v.modality_names[int(table[r.start])] == m == v.modality_names[int(table[r.stop - 1])]
        if r.start:
            assert int(table[r.start - 1]) == v.modality_index(m) - 1
    g = torch.Generator().manual_seed(0)
    segments = [(m, torch.randint(0, v.ranges[m].size, (5,), generator=g)) for m in ("image", "text", "physics")]
    ids, mods = v.encode_sample(segments)
    assert torch.equal(table[ids], mods)


def test_modality_table_is_one_cached_tensor_per_device():
    v = make_vocab()
    t = v.modality_table()
    assert v.modality_table() is t and v.modality_table("cpu") is t and v.modality_table(torch.device("cpu")) is t
    assert v.modality_table() is not make_vocab().modality_table()   # per vocabulary, not global


def test_encode_decode_sample_round_trip():
    v = make_vocab()
    segments = [("text", torch.tensor([5, 6, 7])), ("image", torch.tensor([0, 4095, 3])),
                ("audio", torch.tensor([[1, 2], [3, 4]])), ("shape3d", torch.tensor([9])),
                ("physics", torch.tensor([999])), ("video", torch.tensor([0]))]
    ids, mods = v.encode_sample(segments)
    assert ids.shape == mods.shape and ids.dtype == torch.long
    assert int(ids[0]) == v.bos_id and int(ids[-1]) == v.eos_id
    assert int(mods[0]) == 0 and int(mods[1]) == v.modality_index("text")
    # every position of the image segment, markers included, carries the image's modality id
    img = (mods == v.modality_index("image")).nonzero().reshape(-1)
    assert img.numel() == 3 + 2 and int(ids[img[0]]) == v.begin_id("image")
    back = v.decode_sample(ids)
    assert [m for m, _ in back] == [m for m, _ in segments]
    for (_, a), (_, b) in zip(back, segments):
        assert torch.equal(a, b.reshape(-1))
    # padding after <eos> is ignored
    padded = torch.cat([ids, torch.full((4,), v.pad_id)])
    assert len(v.decode_sample(padded)) == len(segments)


def test_out_of_range_ids_are_rejected():
    v = make_vocab()
    with pytest.raises(ValueError, match=r"id .* out of range \[0, "):
        v.decode_sample([v.bos_id, v.size])
    with pytest.raises(ValueError, match="out of range"):
        v.check_ids([-1])
    with pytest.raises(ValueError, match="token 4096 of modality 'image'"):
        v.to_global("image", [4096])
    with pytest.raises(ValueError, match="not in the range of modality 'audio'"):
        v.to_local("audio", [5])
    with pytest.raises(ValueError, match="inside a 'image' segment but outside its range"):
        v.decode_sample([v.begin_id("image"), 3, v.end_id("image")])
    with pytest.raises(ValueError, match="not closed"):
        v.decode_sample([v.begin_id("text"), 3])
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        v.to_global("smell", [0])


def test_json_round_trip_and_tamper_check(tmp_path):
    v = make_vocab()
    path = tmp_path / "vocab.json"
    v.save(path)
    w = Vocab.load(path)
    assert w.to_dict() == v.to_dict()
    d = json.loads(path.read_text())
    d["ranges"][1]["start"] += 1
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="disagree"):
        Vocab.load(path)


def test_bad_construction():
    with pytest.raises(ValueError, match="size of modality 'image'"):
        Vocab(10, {"image": 0})
    with pytest.raises(ValueError, match="given twice"):
        Vocab(10, {"text": 3})
