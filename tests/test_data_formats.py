"""Audio, physics HDF5, 3D, image and text inputs written by their own libraries (issue 13):
soundfile writes WAV/FLAC/OGG, PyAV M4A, h5py both HDF5 layouts, trimesh GLB/OBJ/STL/PLY/OFF,
Pillow every image kind, pyarrow Parquet. Each goes through `mmfm data build`, `mmfm data
verify`, the reader and a tokenizer's prepare/encode; corrupt and truncated files of each
format are named and counted."""
import io
import json

import av
import h5py
import numpy as np
import pytest
import soundfile
import torch
import trimesh
from PIL import Image

from mmfm.cli import main
from mmfm.tokenizers.data import read_samples


def build(modality, src, out, *extra):
    return main(["data", "build", "--modality", modality, "--src", str(src), "--out", str(out), "--quiet", *extra])


def report(out, modality):
    return json.loads((out / f"{modality}-build-report.json").read_text())


def by_key(out):
    return {s["__key__"]: s for s in read_samples(str(out))}


# -- audio ------------------------------------------------------------------------------------
def tone(rate, seconds, freq=440.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, 1)


def m4a_bytes(x, rate) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="ipod") as c:  # .m4a is the ipod muxer: AAC in MP4
        s = c.add_stream("aac", rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, 0][None]), format="fltp", layout="mono")
        frame.sample_rate = rate
        for p in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(p)
    return buf.getvalue()


def test_audio_files_of_every_format_rate_and_channel_count(tmp_path, capsys):
    from mmfm.tokenizers.audio import AudioCodec, AudioConfig

    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "flac44k_stereo.flac", tone(44100, 0.5, channels=2), 44100)
    soundfile.write(src / "wav24bit.wav", tone(48000, 0.5), 48000, subtype="PCM_24")
    soundfile.write(src / "vorbis.ogg", tone(22050, 0.5), 22050, format="OGG", subtype="VORBIS")
    (src / "aac.m4a").write_bytes(m4a_bytes(tone(24000, 0.5), 24000))
    (src / "aac.txt").write_text("a tone")
    good = io.BytesIO()
    soundfile.write(good, tone(16000, 0.5), 16000, format="FLAC")
    (src / "cut.flac").write_bytes(good.getvalue()[:200])     # truncated inside the first frame
    (src / "fake.mp3").write_bytes(b"ID3" + bytes(300))        # an MP3 header and nothing after it
    soundfile.write(src / "silent.wav", np.zeros((0, 1), np.float32), 16000)
    out = tmp_path / "out"
    assert build("audio", src, out) == 1
    text = capsys.readouterr().out
    assert "wrote 4 audio samples" in text
    r = report(out, "audio")
    names = {p["name"].rsplit("/", 1)[-1]: p["reason"] for p in r["problems"]}
    assert names["cut.flac"] == "corrupt" and names["silent.wav"] == "too_short"
    assert names["fake.mp3"] in ("corrupt", "too_short")
    assert main(["data", "verify", str(out), "--quiet"]) == 0
    samples = by_key(out)
    assert samples["flac44k_stereo"]["json"]["channels"] == 2 and samples["wav24bit"]["json"]["sample_rate"] == 48000
    assert samples["aac"]["txt"] == "a tone"
    codec = AudioCodec(AudioConfig(sample_rate=16000, clip_samples=6400))
    for key, s in samples.items():
        wave = codec.prepare(s).numpy()                      # any rate, any channels -> 16 kHz mono
        peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
        assert abs(peak - 440) < 8, (key, peak)
    assert codec.encode_batch([samples["vorbis"], samples["aac"]]).shape == (2, codec.tokens_per_sample)


# -- physics HDF5 -----------------------------------------------------------------------------
def pdebench_1d(path, n=3, t=6, x=16):
    data = np.random.default_rng(0).normal(size=(n, t, x)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["tensor"] = data
        f["x-coordinate"] = (np.arange(x) + 0.5) / x
        f["t-coordinate"] = np.arange(t + 1) * 0.05           # PDEBench stores T + 1 times
        f.attrs["nu"] = 0.01
    return data


def pdebench_cfd_2d(path, n=2, t=5, g=8):
    rng = np.random.default_rng(1)
    fields = {k: rng.normal(size=(n, t, g, g)).astype(np.float32) for k in ("density", "pressure", "Vx", "Vy")}
    with h5py.File(path, "w") as f:
        for k, v in fields.items():
            f[k] = v
        f["x-coordinate"] = np.linspace(0, 1, g)
        f["y-coordinate"] = np.linspace(0, 2, g)
        f["t-coordinate"] = np.linspace(0, 0.4, t)
    return fields


def pdebench_groups(path, n=2, t=4, g=8, c=2):
    data = np.random.default_rng(2).normal(size=(n, t, g, g, c)).astype(np.float32)
    with h5py.File(path, "w") as f:
        for i in range(n):
            f[f"{i:04d}/data"] = data[i]
            f[f"{i:04d}/grid/x"] = np.linspace(0, 1, g)
            f[f"{i:04d}/grid/y"] = np.linspace(0, 1, g)
            f[f"{i:04d}/grid/t"] = np.linspace(0, 0.3, t)
    return data


def the_well(path, n=2, t=5, g=8):
    rng = np.random.default_rng(3)
    temp = rng.normal(size=(n, t, g, g)).astype(np.float32)
    vel = rng.normal(size=(n, t, g, g, 2)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset_name": "toy", "grid_type": "cartesian", "n_spatial_dims": 2, "n_trajectories": n})
        d = f.create_group("dimensions")
        d.attrs["spatial_dims"] = ["x", "y"]
        d["time"] = np.linspace(0, 1, t)
        d["time"].attrs.update(sample_varying=False, time_varying=True)
        d["x"] = np.linspace(0, 1, g, endpoint=False)
        d["y"] = np.linspace(0, 1, g, endpoint=False)
        bc = f.create_group("boundary_conditions").create_group("x_periodic")
        bc.attrs.update(bc_type="periodic", associated_dims=["x"])
        s = f.create_group("scalars")
        s["Rayleigh"] = 1e6
        t0 = f.create_group("t0_fields")
        t0["buoyancy"] = temp
        t0["buoyancy"].attrs.update(sample_varying=True, time_varying=True)
        t0["mask"] = np.ones((g, g), np.float32)              # shared by every trajectory and time
        t0["mask"].attrs.update(sample_varying=False, time_varying=False)
        t1 = f.create_group("t1_fields")
        t1["velocity"] = vel
        t1["velocity"].attrs.update(sample_varying=True, time_varying=True)
        f.create_group("t2_fields")
    return temp, vel


def test_physics_hdf5_in_the_pdebench_and_the_well_layouts(tmp_path, capsys):
    from mmfm.tokenizers.physics import PhysicsConfig, PhysicsTokenizer

    src = tmp_path / "src"
    src.mkdir()
    burgers = pdebench_1d(src / "burgers.hdf5")
    cfd = pdebench_cfd_2d(src / "cfd.h5")
    groups = pdebench_groups(src / "react.h5")
    temp, vel = the_well(src / "well.hdf5")
    (src / "well.txt").write_text("convection")
    with h5py.File(src / "odd.h5", "w") as f:                  # HDF5, but in neither layout
        f["labels"] = np.arange(4)
    (src / "cut.h5").write_bytes((src / "cfd.h5").read_bytes()[:3000])
    out = tmp_path / "out"
    assert build("physics", src, out) == 1
    text = capsys.readouterr().out
    assert "wrote 9 physics samples" in text
    names = {p["name"].rsplit("/", 1)[-1]: (p["reason"], p["detail"]) for p in report(out, "physics")["problems"]}
    assert names["odd.h5"][0] == "wrong_shape" and "neither layout" in names["odd.h5"][1]
    assert names["cut.h5"][0] in ("corrupt", "wrong_shape")
    assert main(["data", "verify", str(out), "--quiet"]) == 0
    s = by_key(out)

    b = s["burgers__000001"]
    np.testing.assert_array_equal(b["npz"]["fields"][:, 0], burgers[1])
    assert b["json"]["channel_names"] == ["u"] and b["json"]["parameters"] == {"nu": 0.01}
    assert b["json"]["time_step"] == pytest.approx(0.05) and b["json"]["grid_spacing"] == [pytest.approx(1 / 16)]

    c = s["cfd__000001"]
    assert c["json"]["channel_names"] == ["Vx", "Vy", "density", "pressure"]
    np.testing.assert_array_equal(c["npz"]["fields"][:, 2], cfd["density"][1])
    assert c["json"]["grid_spacing"] == [pytest.approx(1 / 7), pytest.approx(2 / 7)]

    g = s["react__000000"]
    np.testing.assert_array_equal(g["npz"]["fields"], np.moveaxis(groups[0], -1, 1))

    w = s["well__000001"]
    assert w["json"]["channel_names"] == ["buoyancy", "mask", "velocity_x", "velocity_y"]
    np.testing.assert_array_equal(w["npz"]["fields"][:, 0], temp[1])
    np.testing.assert_array_equal(w["npz"]["fields"][:, 3], vel[1, ..., 1])
    assert (w["npz"]["fields"][:, 1] == 1).all()             # broadcast over time
    assert w["json"]["boundary_conditions"] == {"x_periodic": "periodic"}
    assert w["json"]["parameters"] == {"Rayleigh": 1e6} and w["txt"] == "convection"
    assert w["json"]["layout"] == "the_well" and w["json"]["time_step"] == pytest.approx(0.25)

    tok = PhysicsTokenizer(PhysicsConfig(grid=8, channels=4, frames=4, downsamples=1))
    assert tok.encode(w).shape == (tok.tokens_per_sample,)
    fine = PhysicsTokenizer(PhysicsConfig(grid=16, channels=4, frames=4, downsamples=1))
    x = fine.prepare(w)                                       # an 8x8 run for a 16x16 tokenizer: resampled
    assert x.shape == (4, 4, 16, 16) and torch.allclose(x.mean((2, 3)), torch.from_numpy(w["npz"]["fields"][:4]).mean((2, 3)),
                                                         atol=1e-5)
    assert (x[:, 1] == 1).all()                               # a constant field stays constant


# -- 3D ---------------------------------------------------------------------------------------
def test_meshes_and_point_clouds_through_trimesh(tmp_path, capsys):
    from mmfm.tokenizers.shape3d import Shape3DConfig, Shape3DTokenizer

    src = tmp_path / "src"
    src.mkdir()
    box = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    scene = trimesh.Scene([box, trimesh.creation.icosphere(radius=0.5).apply_translation((3, 0, 0))])
    (src / "scene.glb").write_bytes(scene.export(file_type="glb"))
    (src / "scene.txt").write_text("a box beside a ball")
    box.export(src / "box.obj")
    box.export(src / "box_stl.stl")
    box.export(src / "box_off.off")
    trimesh.PointCloud(np.random.default_rng(0).normal(size=(100, 3))).export(src / "cloud.ply")
    (src / "bad.glb").write_bytes(b"glTF" + bytes(40))
    out = tmp_path / "out"
    assert build("shape3d", src, out, "--num-points", "256") == 1
    text = capsys.readouterr().out
    assert "wrote 5 shape3d samples" in text and "bad.glb" in text and "corrupt" in text
    assert main(["data", "verify", str(out), "--quiet"]) == 0
    s = by_key(out)
    for key in ("box", "box_stl", "box_off"):
        pts, nrm = s[key]["npz"]["points"], s[key]["npz"]["normals"]
        assert pts.shape == (256, 3)
        assert np.allclose(np.abs(pts).max(1), 1.0, atol=1e-5)            # every sample on the box's surface
        assert np.allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-5)
    glb = s["scene"]["npz"]["points"]
    assert glb[:, 0].max() > 3.4 and glb[:, 0].min() < -0.9                # both parts, transforms applied
    assert s["scene"]["txt"] == "a box beside a ball"
    assert s["cloud"]["json"]["num_points"] == 100 and not s["cloud"]["json"]["has_faces"]
    tok = Shape3DTokenizer(Shape3DConfig(num_points=128, out_points=128))
    assert tok.encode(s["box"]).shape == (tok.tokens_per_sample,)


# -- images -----------------------------------------------------------------------------------
def exif_rotated_jpeg() -> bytes:
    """A 8 wide x 4 high JPEG, left half black, tagged orientation 6 (shown rotated 90 degrees clockwise)."""
    arr = np.full((4, 8, 3), 255, np.uint8)
    arr[:, :4] = 0
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_image_kinds_are_normalised(tmp_path, capsys):
    from mmfm.tokenizers.image import ImageConvConfig, ImageConvTokenizer

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((6, 5), 40000, np.uint16)).save(src / "deep16.png")          # 16-bit grey
    pal = Image.new("P", (5, 5))
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 1
    pal.save(src / "palette.png", transparency=1)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(src / "cmyk.jpg")                  # red in CMYK
    Image.fromarray(np.full((6, 6, 3), (10, 200, 30), np.uint8)).save(src / "lossless.webp", lossless=True)
    frames = [Image.new("RGB", (4, 4), c) for c in ((250, 0, 0), (0, 250, 0))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (src / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    Image.fromarray(np.full((4, 4, 3), 77, np.uint8)).save(src / "plain.jpg", quality=90)
    (src / "cut.jpg").write_bytes((src / "plain.jpg").read_bytes()[:60])
    (src / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    out = tmp_path / "out"
    assert build("image", src, out) == 1
    text = capsys.readouterr().out
    assert "wrote 7 image samples" in text
    r = {p["name"].rsplit("/", 1)[-1]: p["reason"] for p in report(out, "image")["problems"]}
    assert r == {"cut.jpg": "corrupt", "scan.heic": "unsupported_extension"}
    assert main(["data", "verify", str(out), "--quiet"]) == 0
    s = by_key(out)
    assert s["deep16"]["png"].dtype == np.uint8 and abs(int(s["deep16"]["png"][0, 0]) - round(40000 / 65535 * 255)) <= 1
    assert s["palette"]["png"].shape == (5, 5, 4) and s["palette"]["png"][0, 0, 3] == 0   # the transparent index
    assert tuple(s["palette"]["png"][1, 1]) == (255, 0, 0, 255)
    assert s["cmyk"]["png"].shape == (4, 4, 3) and s["cmyk"]["png"][0, 0, 0] > 200 and s["cmyk"]["png"][0, 0, 1] < 60
    assert tuple(s["lossless"]["png"][2, 2]) == (10, 200, 30)
    assert s["anim"]["png"][0, 0, 0] > 200 and s["anim"]["png"][0, 0, 1] < 30           # the first frame
    rot = s["rotated"]["png"]
    assert rot.shape[:2] == (8, 4) and s["rotated"]["json"]["exif_transposed"]           # shown upright: 4 wide, 8 high
    assert rot[:4].mean() < 60 and rot[4:].mean() > 200                                  # the black half is on top
    assert "jpg" in s["plain"] and s["plain"]["json"]["original_format"] == "jpeg"        # stored as given
    tok = ImageConvTokenizer(ImageConvConfig(image_size=16))
    assert tok.encode_batch([s[k] for k in sorted(s)]).shape == (7, tok.tokens_per_sample)


# -- text -------------------------------------------------------------------------------------
def test_text_from_jsonl_txt_and_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "essay.txt").write_text("A whole file is one document.")
    (src / "web.jsonl").write_text("\n".join([json.dumps({"id": "a1", "content": "first record"}),
                                             json.dumps({"id": "a2", "content": "second record"}),
                                             "{not json", json.dumps({"id": "a3", "title": "no content"})]))
    pq.write_table(pa.table({"id": [7, 8], "content": ["row seven", "row eight"]}), src / "dump.parquet")
    (src / "cut.parquet").write_bytes((src / "dump.parquet").read_bytes()[:40])
    out = tmp_path / "out"
    assert build("text", src, out, "--text-field", "content") == 1
    text = capsys.readouterr().out
    assert "wrote 5 text samples" in text
    r = {(p["name"].rsplit("/", 1)[-1], p["reason"]) for p in report(out, "text")["problems"]}
    assert r == {("web.jsonl:3", "corrupt"), ("web.jsonl:4", "no_payload"), ("cut.parquet", "corrupt")}
    s = by_key(out)
    assert s["web__a2"]["txt"] == "second record" and s["dump__8"]["txt"] == "row eight"
    assert s["essay"]["txt"] == "A whole file is one document."
    # one Parquet file as --src
    assert build("text", src / "dump.parquet", tmp_path / "o2", "--text-field", "content") == 0
    assert sorted(by_key(tmp_path / "o2")) == ["7", "8"]


def test_a_folder_with_nothing_usable_says_why(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "clip.avi").write_bytes(b"RIFF")
    (src / "clip.txt").write_text("caption")
    assert build("video", src, tmp_path / "out") == 1
    text = capsys.readouterr().out
    assert "wrote 0 video samples" in text and "nothing written" in text and "clip.avi" in text
    assert ".mp4" in text  # the accepted extensions are listed


def test_threshold_stops_the_run_and_keeps_what_was_written(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((4, 4, 3), i * 10, np.uint8)).save(src / f"a{i}.png")
    for i in range(10):
        (src / f"b{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    rc = build("image", src, out, "--max-bad-fraction", "0.3", "--min-inputs", "8", "--shard-size", "4")
    text = capsys.readouterr().out
    assert rc == 1 and "stopped early" in text
    r = report(out, "image")
    assert r["stopped"] and r["written"] == 6 and r["inputs"] < 16
    assert len(read_samples(str(out))) == 6                      # the partial second shard was published


def test_sigint_stops_the_build_and_publishes_every_sample_written(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2000):
        Image.fromarray(np.full((4, 4), i % 256, np.uint8)).save(src / f"g{i:05d}.png")
    out = tmp_path / "out"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-m", "mmfm.cli", "data", "build", "--modality", "image", "--src", str(src),
                          "--out", str(out), "--shard-size", "50", "--quiet"], cwd=repo, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "image-000001.tar").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, stderr[-2000:]
    assert "stopped early: SIGINT received" in stdout
    r = report(out, "image")
    assert 100 <= r["written"] < 2000                     # stopped part-way ...
    assert len(read_samples(str(out))) == r["written"]    # ... and every sample it wrote is in a published shard
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "image-manifest.json").read_text())["samples"] == r["written"]
