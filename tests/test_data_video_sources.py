"""Video through PyAV and existing webdatasets as sources (issue 13).

Every input here is written by the library people make it with: PyAV writes the MP4/WebM
clips and the MP3, soundfile the FLAC, Pillow the JPEGs, webdataset's TarWriter the shards in
the img2dataset, video2dataset and audio-webdataset layouts. They go through `mmfm data build`,
`mmfm data verify`, the reader (ShardDataset via read_samples) and a tokenizer.
"""
import io
import json
import os
import tarfile
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from mmfm.cli import main
from mmfm.data.video import VideoClip, VideoTooShort, encode_mp4, sample_frames
from mmfm.tokenizers.data import read_samples

STEP = 4  # grey level per frame index: frame i is a flat image of value STEP * i


def grey_frames(n, h=32, w=48):
    return np.stack([np.full((h, w, 3), STEP * i, np.uint8) for i in range(n)])


def pyav_clip(frames, fps, fmt="mp4", codec="libx264", gop=None) -> bytes:
    """A clip written with PyAV directly (not through mmfm), as a user's tool would."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def frame_index(img) -> int:
    return int(round(float(np.mean(img)) / STEP))


def test_sample_frames_seeks_instead_of_decoding_the_clip():
    clip = VideoClip(pyav_clip(grey_frames(60), 6, gop=6))  # 10 s, a keyframe every second
    assert (clip.num_frames, clip.fps, clip.width, clip.height) == (60, 6.0, 48, 32)
    out = sample_frames(clip, 4, fps=0.5, size=16)           # t = 0, 2, 4, 6 s: frames 0, 12, 24, 36
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    assert [frame_index(f) for f in out] == [0, 12, 24, 36]
    assert clip.decoded_frames <= 4 * 6 + 4, clip.decoded_frames  # a GOP per target, not the 37 frames up to 36
    clip.decoded_frames = 0
    out = sample_frames(clip, 3, fps=None, start=5.0)        # native rate from 5 s: frames 30, 31, 32
    assert [frame_index(f) for f in out] == [30, 31, 32] and clip.decoded_frames <= 6 + 3
    with pytest.raises(VideoTooShort, match="too short"):
        sample_frames(clip, 3, fps=0.2)                      # needs 10 s of clip past its start


def test_mp4_encoder_round_trip_and_odd_sizes():
    frames = grey_frames(8, 31, 47)                          # odd sides: stored 4:4:4, size kept
    clip = VideoClip(encode_mp4(frames, 8))
    assert (clip.num_frames, clip.width, clip.height) == (8, 47, 31)
    assert [frame_index(f) for f in sample_frames(clip, 8)] == list(range(8))


def _video_folder(root):
    root.mkdir()
    (root / "ramp.mp4").write_bytes(pyav_clip(grey_frames(24), 12, gop=12))
    (root / "ramp.txt").write_text("a grey ramp")
    (root / "ramp.json").write_text(json.dumps({"license": "CC0-1.0"}))
    (root / "vp9.webm").write_bytes(pyav_clip(grey_frames(12, 32, 32), 8, fmt="webm", codec="libvpx-vp9"))
    good = pyav_clip(grey_frames(24), 12)
    (root / "cut.mp4").write_bytes(good[: len(good) // 2])   # truncated: the index (moov) is lost
    (root / "noise.mkv").write_bytes(os.urandom(3000))       # named .mkv, is not one
    (root / "old.avi").write_bytes(b"RIFF....AVI ")          # an extension video build does not read
    (root / "orphan.txt").write_text("a caption whose clip is missing")


def test_build_video_folder_stores_mp4_bytes_and_names_every_skip(tmp_path, capsys):
    from mmfm.tokenizers.video import VideoConfig, VideoTokenizer

    _video_folder(tmp_path / "src")
    out = tmp_path / "shards"
    rc = main(["data", "build", "--modality", "video", "--src", str(tmp_path / "src"), "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1  # two inputs failed
    assert "wrote 2 video samples" in text
    for name, reason in (("cut.mp4", "corrupt"), ("noise.mkv", "corrupt"), ("old.avi", "unsupported_extension"),
                         ("orphan.txt", "no_payload")):
        assert any(name in line and reason in line for line in text.splitlines()), (name, reason, text)
    report = json.loads((out / "video-build-report.json").read_text())
    assert report["counts"] == {"corrupt": 2, "unsupported_extension": 1, "no_payload": 1}
    # the shard keeps the original encoded bytes
    read = {r["__key__"]: r for r in wds.WebDataset(str(out / "video-000000.tar"), shardshuffle=False)}
    assert read["ramp"]["mp4"] == (tmp_path / "src" / "ramp.mp4").read_bytes()
    assert read["vp9"]["webm"] == (tmp_path / "src" / "vp9.webm").read_bytes()
    meta = json.loads(read["ramp"]["json"])
    assert (meta["num_frames"], meta["fps"], meta["width"], meta["license"]) == (24, 12.0, 48, "CC0-1.0")
    assert main(["data", "verify", str(out), "--quiet"]) == 0

    samples = {s["__key__"]: s for s in read_samples(str(out))}
    assert isinstance(samples["ramp"]["mp4"], VideoClip) and samples["ramp"]["txt"] == "a grey ramp"
    tok = VideoTokenizer(VideoConfig(frames=5, image_size=16, patch_size=8, temporal_patch=4, fps=4))
    x = tok.prepare(samples["ramp"])                        # 5 frames at 4 fps of a 12 fps clip: 0, 3, 6, 9, 12
    assert x.shape == (5, 3, 16, 16)
    assert [int(round(float(f.mean()) * 255 / STEP)) for f in x] == [0, 3, 6, 9, 12]
    assert tok.encode(samples["vp9"]).shape == (tok.tokens_per_sample,)
    too_long = VideoTokenizer(VideoConfig(frames=9, image_size=16, patch_size=8, temporal_patch=4, fps=1))
    with pytest.raises(VideoTooShort):
        too_long.prepare(samples["ramp"])                   # 9 s asked of a 2 s clip


def test_verify_and_reader_catch_a_clip_that_disagrees_with_its_json(tmp_path, capsys):
    data = pyav_clip(grey_frames(6), 6)
    meta = {"modality": "video", "source": "t", "license": "t", "fps": 6, "num_frames": 9, "width": 48, "height": 32}
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "liar", "mp4": data, "json": json.dumps(meta).encode()})
    assert main(["data", "verify", str(tmp_path), "--quiet"]) == 1
    assert "holds 6 frames" in capsys.readouterr().out


# -- existing webdatasets as sources ----------------------------------------------------------
def _jpeg(value, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def img2dataset_shards(folder, n_shards=2, per_shard=3):
    """Shards as img2dataset writes them: KEY.jpg, KEY.txt (caption), KEY.json (url, status, sizes)."""
    folder.mkdir()
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w.write({"__key__": key, "jpg": _jpeg(20 * i + 5), "txt": f"photo {key}".encode(),
                         "json": json.dumps({"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                                             "caption": f"photo {key}", "width": 12, "height": 10}).encode()})
        (folder / f"{s:05d}_stats.json").write_text("{}")  # img2dataset's per-shard stats file
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")   # and its per-shard parquet (not an input here)


@pytest.mark.parametrize("spec", ["brace", "glob", "folder", "pipe"])
def test_build_from_img2dataset_shards(tmp_path, capsys, spec):
    from mmfm.tokenizers.image import ImageConvConfig, ImageConvTokenizer

    img2dataset_shards(tmp_path / "i2d")
    src = {"brace": str(tmp_path / "i2d" / "{00000..00001}.tar"), "glob": str(tmp_path / "i2d" / "*.tar"),
           "folder": str(tmp_path / "i2d"), "pipe": f"pipe:cat {tmp_path / 'i2d'}/{{00000..00001}}.tar"}[spec]
    out = tmp_path / "out"
    assert main(["data", "build", "--modality", "image", "--src", src, "--out", str(out), "--quiet"]) == 0
    assert "wrote 6 image samples" in capsys.readouterr().out
    samples = {s["__key__"]: s for s in read_samples(str(out))}
    assert sorted(samples) == [f"{s:05d}{i:04d}" for s in range(2) for i in range(3)]
    s = samples["000010002"]
    assert s["txt"] == "photo 000010002"
    assert s["json"]["source_meta"]["url"] == "https://example.com/000010002.jpg"  # the tool's metadata, kept
    assert s["json"]["source"].endswith(":000010002")
    assert abs(float(s["jpg"].mean()) - 45) < 2                                     # the JPEG, stored as given
    tok = ImageConvTokenizer(ImageConvConfig(image_size=16))
    assert tok.encode(s).shape == (tok.tokens_per_sample,)


def test_build_from_video2dataset_and_audio_webdatasets_with_map(tmp_path, capsys):
    from mmfm.tokenizers.audio import AudioCodec, AudioConfig

    (tmp_path / "v2d").mkdir()
    with wds.TarWriter(str(tmp_path / "v2d" / "00000.tar")) as w:
        for i in range(2):
            w.write({"__key__": f"vid{i}", "mp4": pyav_clip(grey_frames(12 + i), 12), "txt": b"a ramp",
                     "json": json.dumps({"url": "https://example.com/v.mp4", "duration": 1.0}).encode()})
        w.write({"__key__": "broken", "mp4": b"\x00\x00\x00 ftypisom" + os.urandom(500), "txt": b"x"})
    out = tmp_path / "vout"
    assert main(["data", "build", "--modality", "video", "--src", str(tmp_path / "v2d" / "00000.tar"),
                 "--out", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "wrote 2 video samples" in text and "00000.tar:broken" in text and "corrupt" in text
    clips = {s["__key__"]: s for s in read_samples(str(out))}
    assert clips["vid1"]["mp4"].num_frames == 13 and clips["vid0"]["json"]["source_meta"]["duration"] == 1.0

    # audio: FLAC by soundfile, MP3 by PyAV, captions under a field name of the tool's own choosing
    rate = 22050
    t = np.arange(rate // 2) / rate
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    flac = io.BytesIO()
    soundfile.write(flac, np.stack([tone, tone], 1), rate, format="FLAC")
    mp3 = io.BytesIO()
    with av.open(mp3, mode="w", format="mp3") as c:
        s = c.add_stream("libmp3lame", rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
        frame.sample_rate = rate
        for p in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(p)
    (tmp_path / "aud").mkdir()
    with wds.TarWriter(str(tmp_path / "aud" / "a-000.tar")) as w:
        w.write({"__key__": "f", "flac": flac.getvalue(), "transcript": b"a tone", "json": b'{"license": "CC0-1.0"}'})
        w.write({"__key__": "m", "mp3": mp3.getvalue(), "transcript": b"the same tone"})
    out = tmp_path / "aout"
    assert main(["data", "build", "--modality", "audio", "--src", str(tmp_path / "aud" / "a-{000..000}.tar"),
                 "--map", "caption=transcript,audio=flac;mp3", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    samples = {s["__key__"]: s for s in read_samples(str(out))}
    assert samples["f"]["txt"] == "a tone" and samples["f"]["json"]["license"] == "CC0-1.0"
    assert samples["f"]["json"]["channels"] == 2 and samples["m"]["json"]["sample_rate"] == rate
    codec = AudioCodec(AudioConfig(sample_rate=16000, clip_samples=6400))
    for key in "fm":
        wave = codec.prepare(samples[key]).numpy()            # mono, resampled 22050 -> 16000
        peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
        assert abs(peak - 440) < 8, (key, peak)
        assert codec.encode(samples[key]).shape == (codec.tokens_per_sample,)


def test_map_is_checked_and_unmapped_fields_are_reported(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "x.tar")) as w:
        w.write({"__key__": "a", "png": _png(), "cap": b"square", "exif": b"{}"})
    rc = main(["data", "build", "--modality", "image", "--src", str(tmp_path / "s" / "x.tar"), "--map", "colour=cap",
               "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "colour=cap" in capsys.readouterr().err
    assert main(["data", "build", "--modality", "image", "--src", str(tmp_path / "s" / "x.tar"), "--map", "caption=cap",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "unused_field" in text and ".exif" in text
    assert read_samples(str(tmp_path / "o"))[0]["txt"] == "square"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_source_shard_is_named_and_what_came_before_is_kept(tmp_path, capsys):
    img2dataset_shards(tmp_path / "i2d", n_shards=1, per_shard=4)
    path = tmp_path / "i2d" / "00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # cut inside a later sample
    rc = main(["data", "build", "--modality", "image", "--src", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1 and "corrupt_shard" in text and "00000.tar" in text
    n = len(read_samples(str(tmp_path / "o")))
    assert 1 <= n < 4
    with tarfile.open(tmp_path / "o" / "image-000000.tar") as t:
        assert len([m for m in t.getnames() if m.endswith(".jpg")]) == n
