"""Generation (mmfm/generate): KV-cached decoding against full recomputation, the modality state
machine, classifier-free guidance at its two plain ends, and every output format written by
`mmfm generate` and read back. Every model and tokenizer here is tiny and built in a tmp dir."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmfm.generate import Bundle, Constraints, SamplingConfig, Target, decode, generate
from mmfm.generate.outputs import output_path, read_output, write_output
from mmfm.models import ModelConfig, Transformer
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = Vocab(40, {"image": 24, "audio": 16})


def tiny_model(vocab=VOCAB, **kw):
    torch.manual_seed(0)
    # a wide init spreads the logits, so greedy argmaxes are not decided by rounding
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab.size,
                      max_seq_len=128, init_std=0.3, **kw)
    return Transformer(cfg).eval()


def prompts_for(vocab=VOCAB):
    return [torch.tensor([vocab.bos_id, vocab.begin_id("text"), 3, 4, 5, vocab.end_id("text"), vocab.begin_id("image")]),
            torch.tensor([vocab.bos_id, vocab.begin_id("audio")]),
            torch.tensor([vocab.bos_id, vocab.begin_id("text"), 9])]


TARGETS = [Target("image", 10), Target("audio", 6), Target("text", 12)]


@torch.no_grad()
def greedy_recompute(model, prompt, target, vocab=VOCAB, table=None):
    """Greedy decoding that runs the whole sequence every step (no cache), masking by hand."""
    c = Constraints(vocab, [target])
    seq, out = prompt.clone(), []
    while not c.all_done():
        mods = table[seq][None] if table is not None else None
        logits = model(seq[None], modality_ids=mods)[0, -1]
        lo, hi = (int(v) for v in c.allowed_range()[0])
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[lo:hi] = True
        if c.allowed_mask() is not None:
            allowed &= c.allowed_mask()[0]
        t = logits.masked_fill(~allowed, -float("inf")).argmax()
        c.update(t[None])
        out.append(int(t))
        seq = torch.cat([seq, t[None]])
    return out


@pytest.mark.parametrize("sparse", [False, True])
def test_cached_greedy_equals_recomputed_greedy(sparse):
    model = tiny_model(modality_sparse=sparse, num_modalities=len(VOCAB.modality_names) if sparse else 0)
    table = VOCAB.modality_table() if sparse else None
    got = decode(model, prompts_for(), Constraints(VOCAB, TARGETS), SamplingConfig(temperature=0), pad_id=VOCAB.pad_id,
                 mod_table=table)
    for p, t, g in zip(prompts_for(), TARGETS, got):
        want = greedy_recompute(model, p, t, table=table)
        assert g.tolist() == want
        # alone (equal-length rows: the step's slice write and unmasked attention)
        alone = decode(model, [p], Constraints(VOCAB, [t]), SamplingConfig(temperature=0), pad_id=VOCAB.pad_id,
                       mod_table=table)[0]
        assert alone.tolist() == want
    # the image and audio rows ran their full segments plus the forced end marker
    assert got[0].numel() == 11 and int(got[0][-1]) == VOCAB.end_id("image")
    assert got[1].numel() == 7 and int(got[1][-1]) == VOCAB.end_id("audio")


def test_constrained_sampling_never_leaves_the_modality():
    """Temperature 2 over a random model: unconstrained, most draws would land outside the range."""
    model = tiny_model()
    B = 12
    prompts = [prompts_for()[i % 3] for i in range(B)]
    targets = [TARGETS[i % 3] for i in range(B)]
    for seed in range(4):
        rows = decode(model, prompts, Constraints(VOCAB, targets), SamplingConfig(temperature=2.0), seed=seed,
                      pad_id=VOCAB.pad_id)
        for t, row in zip(targets, rows):
            r = VOCAB.ranges[t.modality]
            end = VOCAB.end_id(t.modality)
            if t.modality == "text":
                body = row[:-1] if row.numel() and int(row[-1]) in (end, VOCAB.eos_id) else row
                assert row.numel() <= t.length
            else:
                body = row[:-1]
                assert row.numel() == t.length + 1 and int(row[-1]) == end
            assert bool(((body >= r.start) & (body < r.stop)).all()), (t, row)
    # unconstrained, the same sampler does leave the image range: the constraint is doing the work
    free = decode(model, prompts[:1] * 4, None, SamplingConfig(temperature=2.0), max_new_tokens=10, pad_id=VOCAB.pad_id)
    r = VOCAB.ranges["image"]
    assert any(bool(((f < r.start) | (f >= r.stop)).any()) for f in free)


def test_stop_ids_and_max_new_tokens():
    model = tiny_model()
    row = decode(model, prompts_for()[2:], Constraints(VOCAB, [Target("text", 12)]), SamplingConfig(temperature=0),
                 pad_id=VOCAB.pad_id)[0]
    first = int(row[0])
    stopped = decode(model, prompts_for()[2:], Constraints(VOCAB, [Target("text", 12)], stop_ids=[first]),
                     SamplingConfig(temperature=0), pad_id=VOCAB.pad_id)[0]
    assert stopped.tolist() == [first]
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(model, prompts_for()[2:], None, SamplingConfig(temperature=0), max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        decode(model, prompts_for()[2:], None, SamplingConfig(temperature=0), max_new_tokens=500)
    with pytest.raises(ValueError, match="stop_ids"):
        Constraints(VOCAB, [Target("text", 3)], stop_ids=[VOCAB.size])
    with pytest.raises(ValueError, match="targets\\[0\\].modality"):
        Constraints(VOCAB, [Target("smell", 3)])


def test_presence_penalty_sees_prompt_and_output():
    model = tiny_model()
    p = prompts_for()[2]
    rows = decode(model, [p, p], Constraints(VOCAB, [Target("text", 20)] * 2),
                  SamplingConfig(temperature=0, presence_penalty=1e4), pad_id=VOCAB.pad_id)
    for row in rows:
        body = [t for t in row.tolist() if t < VOCAB.ranges["text"].stop]
        assert len(body) == len(set(body)) and 9 not in body, row
    plain = decode(model, [p], Constraints(VOCAB, [Target("text", 20)]), SamplingConfig(temperature=0),
                   pad_id=VOCAB.pad_id)[0].tolist()
    assert len(set(plain)) < len(plain) or 9 in plain   # without the penalty this model repeats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cfg_scale_one_and_zero_are_the_plain_cases(temperature):
    model = tiny_model()
    cond = prompts_for()[:1] * 2
    uncond = [torch.tensor([VOCAB.bos_id, VOCAB.begin_id("image")])] * 2
    targets = [Target("image", 10)] * 2
    sc = SamplingConfig(temperature=temperature)

    def run(prompts, **kw):
        return [r.tolist() for r in decode(model, prompts, Constraints(VOCAB, targets), sc, seed=3,
                                           pad_id=VOCAB.pad_id, **kw)]

    plain_cond, plain_uncond = run(cond), run(uncond)
    assert plain_cond != plain_uncond
    # the guided path itself (uncond rows in the batch), forced on by a scale a hair off 1 ...
    assert run(cond, uncond=uncond, cfg_scale=1.0 + 1e-12) == plain_cond
    assert run(cond, uncond=uncond, cfg_scale=0.0) == plain_uncond
    # ... and a real scale changes the result
    assert run(cond, uncond=uncond, cfg_scale=4.0) != plain_cond


def test_cfg_mixing_is_lerp_of_the_logits():
    """The distribution sampled at step 0 under guidance is softmax(u + s (c - u))."""
    from mmfm.ops.sampling import processed_probs

    model = tiny_model()
    c, u = prompts_for()[0], torch.tensor([VOCAB.bos_id, VOCAB.begin_id("image")])
    with torch.no_grad():
        lc, lu = model(c[None])[0, -1], model(u[None])[0, -1]
    s = 3.0
    mixed = lu + s * (lc - lu)
    r = VOCAB.ranges["image"]
    p = processed_probs(mixed[None], allowed_range=(r.start, r.stop))[0]
    # the first token's empirical distribution over 400 rows (independent Philox streams) matches p
    n = 400
    rows = decode(model, [c] * n, Constraints(VOCAB, [Target("image", 1)] * n), SamplingConfig(), seed=7,
                  uncond=[u] * n, cfg_scale=s, pad_id=VOCAB.pad_id)
    draws = torch.stack([r[0] for r in rows])
    counts = torch.bincount(draws, minlength=VOCAB.size).double()
    expected = p.double() * n
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected.clamp_min(1e-9))[keep].sum())
    assert counts[~keep].sum() < 25
    assert chi2 < 60, chi2   # ~ 24 bins: p < 1e-4 for a correct sampler



def test_unconditional_twin_keeps_the_given_start_of_the_segment():
    """Guidance contrasts a prompt with its caption-dropped twin; when the prompt already holds the
    start of the target segment (a physics run's first frames), the twin must hold it too, or the
    two rows of a guided pair would generate different positions of the segment."""
    from mmfm.generate.prompt import unconditional_prompt

    b = VOCAB.begin_id("image")
    given = VOCAB.to_global("image", torch.tensor([3, 1, 4]))
    cond = torch.cat([prompts_for()[0], given])
    assert int(prompts_for()[0][-1]) == b
    assert unconditional_prompt(VOCAB, "image", cond).tolist() == [VOCAB.bos_id, b] + given.tolist()
    assert unconditional_prompt(VOCAB, "image", prompts_for()[0]).tolist() == [VOCAB.bos_id, b]
    assert unconditional_prompt(VOCAB, "image").tolist() == [VOCAB.bos_id, b]

# ----------------------------------------------------------------------------- outputs
def test_every_output_format_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    cases = {
        "text": "a small red circle",
        "image": torch.rand(3, 16, 16, generator=g),
        # smooth, as a decoded video is: 4:2:0 MP4 cannot keep per-pixel noise in its colours
        "video": (torch.linspace(0, 0.8, 16)[None, None, :, None] + torch.linspace(0, 0.2, 5)[:, None, None, None]
                  ).expand(5, 3, 16, 16).contiguous(),
        "audio": torch.rand(800, generator=g) * 1.6 - 0.8,
        "shape3d": torch.randn(64, 3, generator=g),
        "physics": torch.randn(2, 1, 16, 16, generator=g),
    }
    for m, value in cases.items():
        path = output_path(str(tmp_path / f"out_{m}"), m)
        paths = write_output(path, m, value, sample_rate=16000)
        assert all(os.path.getsize(p) > 0 for p in paths)
        back = read_output(path, m)
        if m == "text":
            assert back == value
        elif m == "audio":
            wav, rate = back
            assert rate == 16000 and torch.allclose(wav, value, atol=1 / 32767 + 1e-6)
        elif m == "image":
            assert back.shape == value.shape and (back - value).abs().max() <= 0.5 / 255 + 1e-6
        elif m == "video":  # MP4 by default: lossy, so only the shape and the coarse content
            assert back.shape == value.shape and (back - value).abs().mean() < 0.02
        elif m == "shape3d":
            assert torch.allclose(back, value, rtol=1e-5, atol=1e-5)
            assert paths[1].endswith(".png") and read_output(paths[1], "image").shape[0] == 3
        else:
            assert torch.equal(back, value) and paths[1].endswith(".png")
    with pytest.raises(ValueError, match="--out"):
        output_path("x.png", "audio")
    assert output_path("x", "audio", 2) == "x-2.wav"
    assert output_path("x.GIF", "video") == "x.gif" and output_path("y", "video") == "y.mp4"


def test_every_output_format_opens_in_the_library_a_user_would_use(tmp_path):
    """MP4 in PyAV, GIF in Pillow, FLAC and WAV in soundfile, PLY/OBJ/GLB in trimesh, HDF5 in h5py."""
    import av
    import h5py
    import soundfile
    import trimesh
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 6)[:, None, None, None].expand(6, 3, 16, 16).contiguous()  # frame t: grey t/5
    mp4 = write_output(str(tmp_path / "v.mp4"), "video", ramp, fps=12)[0]
    with av.open(mp4) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.video[0].average_rate == 12 and c.streams.video[0].codec_context.name in ("h264", "mpeg4")
    assert len(frames) == 6 and [round(float(f.mean()) / 51) for f in frames] == [0, 1, 2, 3, 4, 5]
    gif = write_output(str(tmp_path / "v.gif"), "video", ramp)[0]
    with Image.open(gif) as im:
        assert im.n_frames == 6
    wave = torch.sin(torch.arange(1600) / 5.0) * 0.5
    for ext in (".wav", ".flac"):
        path = write_output(str(tmp_path / f"a{ext}"), "audio", wave, sample_rate=16000)[0]
        data, rate = soundfile.read(path, dtype="float32")
        assert rate == 16000 and np.abs(data - wave.numpy()).max() < 1e-4
    pts = torch.randn(50, 3, generator=g)
    for ext in (".ply", ".obj", ".glb"):
        path = write_output(str(tmp_path / f"s{ext}"), "shape3d", pts)[0]
        geom = trimesh.load(path, process=False)
        if isinstance(geom, trimesh.Scene):
            geom = list(geom.geometry.values())[0]
        assert np.allclose(np.asarray(geom.vertices), pts.numpy(), atol=1e-5)
        assert torch.allclose(read_output(path, "shape3d"), pts, atol=1e-5)
    fields = torch.randn(4, 2, 8, 8, generator=g)
    path = write_output(str(tmp_path / "p.h5"), "physics", fields)[0]
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["u1"][0], fields[:, 1].numpy())   # PDEBench: [samples, time, x, y]
        assert f["x-coordinate"].shape == (8,) and f["t-coordinate"].shape == (4,)
    assert torch.equal(read_output(path, "physics"), fields)


# ------------------------------------------------------------------ the export and the command
def build_export(root) -> str:
    """A tiny export folder with real (untrained) tokenizers for all six modalities."""
    from mmfm.export import write_folder
    from mmfm.tokenizers import build_tokenizer
    from mmfm.tokenizers.audio import AudioConfig
    from mmfm.tokenizers.image import ImageConvConfig
    from mmfm.tokenizers.physics import PhysicsConfig
    from mmfm.tokenizers.shape3d import Shape3DConfig
    from mmfm.tokenizers.text import TextConfig, TextTokenizer
    from mmfm.tokenizers.video import VideoConfig

    toks = {
        "image": build_tokenizer("image_conv", ImageConvConfig(image_size=16, channels=8, downsamples=2,
                                                               codebook_size=32)),
        "audio": build_tokenizer("audio_codec", AudioConfig(clip_samples=1280, channels=8, latent_dim=8,
                                                            codebook_size=32, num_levels=2)),
        "video": build_tokenizer("video", VideoConfig(frames=5, image_size=16, width=16, depth=1, heads=2,
                                                      fsq_levels=[4, 4])),
        "shape3d": build_tokenizer("shape3d", Shape3DConfig(num_points=64, out_points=64, width=16, depth=1, heads=2,
                                                            num_queries=4, latent_dim=8, codebook_size=32,
                                                            scales=[1, 2, 4])),
        "physics": build_tokenizer("physics", PhysicsConfig(grid=16, frames=2, width=8, downsamples=2,
                                                            fsq_levels=[4, 4], refine_width=8)),
    }
    words = ["red", "green", "blue", "circle", "square", "a", "the", "small", "large", "sound", "of", "wave"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 8)) for _ in range(200)]
    toks["text"] = TextTokenizer(TextConfig(vocab_size=300)).fit(texts)
    tok_dir = os.path.join(root, "tokenizers")
    for m, t in toks.items():
        t.save(os.path.join(tok_dir, m))
    vocab = Vocab(toks["text"].vocab_size, {m: toks[m].vocab_size for m in ("image", "audio", "video", "shape3d",
                                                                             "physics")})
    vocab.save(os.path.join(root, "vocab.json"))
    model = tiny_model(vocab)
    return write_folder(model.state_dict(), model.cfg, os.path.join(root, "export"), os.path.join(root, "vocab.json"),
                        tok_dir)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return build_export(str(tmp_path_factory.mktemp("gen_export")))


EXTS = {"text": [".txt"], "image": [".png"], "video": [".mp4"], "audio": [".wav"], "shape3d": [".ply", ".png"],
        "physics": [".npz", ".png"]}


def test_every_modality_is_generated_written_and_read_back(export_dir, tmp_path):
    import mmfm

    bundle = mmfm.Bundle.load(export_dir)
    shapes = {"image": (3, 16, 16), "video": (5, 3, 16, 16), "shape3d": (64, 3), "physics": (2, 1, 16, 16)}
    for m in ("text", "image", "video", "audio", "shape3d", "physics"):
        s = bundle.generate("a red circle", to=m, out=str(tmp_path / f"sample_{m}"),
                            cfg_scale=2.0 if m == "image" else 1.0, sampling=SamplingConfig(top_k=20, temperature=0.9))[0]
        assert [os.path.splitext(p)[1] for p in s.paths] == EXTS[m]
        value = read_output(s.paths[0], m)
        if m == "text":
            assert value == s.value
        elif m == "audio":
            assert value[0].shape == (1280,) and value[1] == 16000
            assert torch.allclose(value[0], s.value.clamp(-1, 1), atol=1 / 32767 + 1e-6)
        else:
            assert tuple(value.shape) == shapes[m]


def test_cli(export_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "shape"
    # a 3D sample conditioned on an image input (read through the same readers as the outputs)
    img = tmp_path / "in.png"
    write_output(str(img), "image", torch.rand(3, 20, 20))
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "generate", "--model", export_dir, "--prompt", "a red circle",
                        "--prompt", "the blue", "--image", str(img), "--to", "3d", "--out", str(out), "--top-k", "20",
                        "--cfg-scale", "1.5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "generate" in p.stderr   # the progress bar
    for i in (0, 1):
        assert read_output(str(tmp_path / f"shape-{i}.ply"), "shape3d").shape == (64, 3)
        assert (tmp_path / f"shape-{i}.png").exists()
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "generate", "--model", export_dir, "--to", "audio",
                        "--out", str(tmp_path / "x.png"), "--no-progress"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "--out" in p.stderr and ".wav" in p.stderr


def test_python_api_batch_and_determinism(export_dir, tmp_path):
    # the one-call function with flat sampling keywords and the Bundle with a SamplingConfig agree
    a = generate(export_dir, ["a red circle", "the blue"], to="image", out=str(tmp_path / "img"), seed=5,
                 temperature=1.0, top_k=30)
    bundle = Bundle.load(export_dir)
    b = bundle.generate(["a red circle", "the blue"], to="image", seed=5,
                        sampling=SamplingConfig(temperature=1.0, top_k=30))
    assert [s.paths[0] for s in a] == [str(tmp_path / "img-0.png"), str(tmp_path / "img-1.png")]
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert all(s.tokens.numel() == 16 and s.value.shape == (3, 16, 16) for s in a)
    c = bundle.generate(["a red circle", "the blue"], to="image", seed=6, sampling=SamplingConfig(temperature=1.0))
    assert any(not torch.equal(x.tokens, y.tokens) for x, y in zip(a, c))
    t = bundle.generate("a small", to="text", max_new_tokens=7, sampling=SamplingConfig(temperature=0))
    assert isinstance(t[0].value, str) and t[0].tokens.numel() <= 7
    with pytest.raises(ValueError, match="'to'"):
        bundle.generate("x", to="smell")
    with pytest.raises(TypeError, match="'sampling'"):
        bundle.generate("x", sampling={"temperature": 0})
    with pytest.raises(ValueError, match="not both"):
        generate(bundle, "x", sampling=SamplingConfig(), top_k=3)


def test_speculative_api_greedy_equals_plain_greedy(export_dir):
    """generate(..., speculative=...) is lossless: at temperature 0 it returns plain greedy text."""
    from mmfm.generate import generate

    plain = generate(export_dir, ["a red", "the"], "text", max_new_tokens=12, temperature=0.0)
    for method, extra in (("token_recycling", {}), ("draft", {"draft_model": export_dir}),
                          ("draft", {"draft_model": export_dir, "draft_tree": "dynamic"})):
        stats = {}
        spec = generate(export_dir, ["a red", "the"], "text", max_new_tokens=12, temperature=0.0,
                        speculative=method, stats=stats, **extra)
        assert [s.tokens.tolist() for s in spec] == [s.tokens.tolist() for s in plain], method
        assert len(stats["rows"]) == 2
    with pytest.raises(ValueError, match="speculative"):
        generate(export_dir, "x", "image", speculative="token_recycling")
    with pytest.raises(ValueError, match="draft_model"):
        generate(export_dir, "x", "text", speculative="draft")
    with pytest.raises(ValueError, match="draft_tree"):
        generate(export_dir, "x", "text", speculative="draft", draft_model=export_dir, draft_tree="bushy")


def test_coprocessor_decoding_equals_the_cache_reference_loop(tmp_path):
    """decode(..., coprocessor=) augments as mmfm.cacheaug.generate does (prompt end and every M tokens);
    greedy outputs agree token for token, and a coprocessor with 0 latents is the plain decoder."""
    from mmfm.cacheaug import Coprocessor, generate as cache_generate, load_coprocessor, save_coprocessor
    from mmfm.generate.decode import decode

    model = tiny_model()
    torch.manual_seed(3)
    cop = Coprocessor.from_decoder(model, num_latents=3).eval()
    with torch.no_grad():   # an untrained coprocessor is a copy of the decoder: perturb it so latents matter
        for p in cop.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_coprocessor(cop, str(tmp_path / "cop"))
    cop = load_coprocessor(str(tmp_path / "cop"), model)
    prompts = [torch.tensor([1, 5, 9, 7]), torch.tensor([2, 8])]
    with torch.no_grad():
        for every in (0, 3):
            ref = cache_generate(model, prompts, 8, coprocessor=cop, every=every, temperature=0.0)
            got = decode(model, prompts, None, SamplingConfig(temperature=0.0), max_new_tokens=8,
                         coprocessor=cop, augment_every=every, stop_on_done=False)
            assert [r.tolist() for r in got] == [r.tolist() for r in ref], every
        plain = decode(model, prompts, None, SamplingConfig(temperature=0.0), max_new_tokens=8)
        zero = decode(model, prompts, None, SamplingConfig(temperature=0.0), max_new_tokens=8,
                      coprocessor=Coprocessor(model.cfg, 0))
        assert [r.tolist() for r in zero] == [r.tolist() for r in plain]
        aug = decode(model, prompts, None, SamplingConfig(temperature=0.0), max_new_tokens=8, coprocessor=cop)
        assert [r.tolist() for r in aug] != [r.tolist() for r in plain]   # the latents do change the output
    with pytest.raises(ValueError, match="augment_every"):
        decode(model, prompts, None, max_new_tokens=4, coprocessor=cop, augment_every=-1)


def test_cli_with_coprocessor_folder(export_dir, tmp_path):
    from mmfm.cacheaug import Coprocessor, save_coprocessor
    from mmfm.generate import Bundle

    cop = Coprocessor.from_decoder(Bundle.load(export_dir).model, num_latents=2)
    save_coprocessor(cop, str(tmp_path / "cop"))
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "generate", "--model", export_dir, "--prompt", "a red",
                        "--to", "text", "--max-new-tokens", "6", "--temperature", "0", "--no-progress",
                        "--coprocessor", str(tmp_path / "cop"), "--augment-every", "2"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr[-2000:]
    q = subprocess.run([sys.executable, "-m", "mmfm.cli", "generate", "--model", export_dir, "--prompt", "a",
                        "--to", "text", "--coprocessor", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert q.returncode == 2 and "missing" in q.stderr


# ------------------------------------------------------------ one modality table for every user
def test_every_decoder_feeds_a_sparse_model_the_vocab_modality_table(export_dir):
    """A Mixture-of-Transformers model picks its weights by modality id, so every decoder must give
    it vocab.modality_table()[ids]: the plain loop (text and a modality segment), both speculative
    decoders, MaskGIT / ReCAP and the cache-augmentation prefill. A hook on the model's forward
    records what each one passes."""
    from mmfm.cacheaug import prefill
    from mmfm.generate.masked import maskgit_decode, recap_decode
    from mmfm.generate.speculative import draft_model_generate, token_recycling_generate
    from mmfm.models import KVCache

    base = Bundle.load(export_dir)
    vocab = base.vocab
    sparse = tiny_model(vocab, modality_sparse=True, num_modalities=len(vocab.modality_names))
    bundle = Bundle(sparse, vocab, base.tokenizers)
    table = vocab.modality_table()
    seen = []

    def check(module, args, kwargs):
        ids = args[0]
        mods = args[1] if len(args) > 1 else kwargs.get("modality_ids")
        seen.append(mods is not None and torch.equal(mods, table[ids]))

    sparse.register_forward_pre_hook(check, with_kwargs=True)
    calls = {}

    def run(name, fn):
        n = len(seen)
        fn()
        calls[name] = len(seen) - n

    greedy = SamplingConfig(temperature=0)
    run("text", lambda: bundle.generate(["a red", "the"], "text", max_new_tokens=6, sampling=greedy))
    run("image", lambda: bundle.generate("a red circle", "image", cfg_scale=2.0))
    run("speculative", lambda: bundle.generate("a red", "text", max_new_tokens=6, sampling=greedy,
                                               speculative="token_recycling"))
    prompt = torch.tensor([vocab.bos_id, vocab.begin_id("text"), 5, 6, 7])
    run("draft", lambda: draft_model_generate(sparse, sparse, prompt, max_new_tokens=5, temperature=0,
                                              modality_table=table))
    r = vocab.ranges["image"]
    pre = torch.tensor([vocab.bos_id, vocab.begin_id("image")])
    masked = dict(mask_id=vocab.mask_id, allowed_range=(r.start, r.stop), seed=0, modality_table=table)
    run("maskgit", lambda: maskgit_decode(sparse, pre, 8, steps=3, **masked))
    run("recap", lambda: recap_decode(sparse, pre, 8, steps=4, full_every=2, **masked))
    run("cacheaug", lambda: prefill(sparse, [prompt], KVCache.for_model(sparse, 1, capacity=8), table=table))
    assert all(calls.values()), calls
    assert all(seen), f"{seen.count(False)} of {len(seen)} forward calls got other modality ids ({calls})"

    # without the table each decoder says which argument is missing
    with pytest.raises(ValueError, match="'mod_table'"):
        decode(sparse, [prompt], None, max_new_tokens=2)
    with pytest.raises(ValueError, match="'modality_table'"):
        token_recycling_generate(sparse, prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="'modality_table'"):
        maskgit_decode(sparse, pre, 4, mask_id=vocab.mask_id, steps=2)


# ------------------------------------------------------------------ SamplingConfig and its flags
def _sampling_flag_values():
    """A value other than the default for every SamplingConfig field, as CLI words and as the field."""
    import dataclasses

    values = {f.name: (7 if f.type in (int, "int") else f.default + 0.25) for f in dataclasses.fields(SamplingConfig)}
    words = [w for k, v in values.items() for w in ("--" + k.replace("_", "-"), str(v))]
    return values, words


def test_every_sampling_field_is_a_flag(capsys):
    import dataclasses

    from mmfm.cli import build_parser
    from mmfm.generate.commands import sampling_from_args
    from mmfm.ops.sampling import PARAM_DEFAULTS, PARAM_NAMES

    # the config holds every parameter of the fused sampler, with the sampler's defaults
    fields = dataclasses.fields(SamplingConfig)
    assert tuple(f.name for f in fields) == PARAM_NAMES
    assert tuple(f.default for f in fields) == PARAM_DEFAULTS
    assert all(f.metadata.get("help") for f in fields)
    parser = build_parser()
    base = ["generate", "--model", "m", "--to", "text"]
    assert sampling_from_args(parser.parse_args(base)) == SamplingConfig()
    values, words = _sampling_flag_values()
    got = sampling_from_args(parser.parse_args(base + words))
    assert got == SamplingConfig(**values) and got != SamplingConfig()
    assert type(got.top_k) is int and type(got.frequency_penalty) is float
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines at the terminal's width
    for f in fields:   # each flag with its field's help
        assert f"--{f.name.replace('_', '-')} {f.name.upper()}" in text and f.metadata["help"][:20] in text


@pytest.mark.parametrize("flag", ["frequency_penalty", "presence_penalty", "repetition_penalty"])
def test_a_penalty_flag_reaches_the_sampler(export_dir, flag, capsys):
    """Greedy text from the tiny model repeats tokens; a large penalty on seen tokens forbids every
    repeat. The command's output is the Python API's with the same field, not the plain one's."""
    from mmfm.cli import main

    bundle = Bundle.load(export_dir)
    strength = 100.0 if flag != "repetition_penalty" else 1e6
    plain = bundle.generate("a red circle", "text", max_new_tokens=24, sampling=SamplingConfig(temperature=0))[0]
    pen = bundle.generate("a red circle", "text", max_new_tokens=24,
                          sampling=SamplingConfig(temperature=0, **{flag: strength}))[0]
    assert len(set(plain.tokens.tolist())) < plain.tokens.numel()          # the plain output repeats
    if flag != "repetition_penalty":   # subtracting 100 always loses; dividing only shrinks positive logits
        assert len(set(pen.tokens.tolist())) == pen.tokens.numel()
    assert pen.value != plain.value
    rc = main(["generate", "--model", export_dir, "--prompt", "a red circle", "--to", "text", "--max-new-tokens", "24",
               "--temperature", "0", "--no-progress", "--" + flag.replace("_", "-"), str(strength)])
    assert rc == 0
    assert capsys.readouterr().out == pen.value + "\n"


def test_masked_decoding_through_bundle_and_cli(export_dir, tmp_path):
    """`--decode masked` is maskgit_decode / recap_decode over the prompt, the segment and its end
    marker + <eos>, in the modality's range (mechanics only: this tiny model is untrained)."""
    from mmfm.generate.masked import maskgit_decode
    from mmfm.generate.prompt import build_prompt

    bundle = Bundle.load(export_dir)
    vocab = bundle.vocab
    s = bundle.generate(["a red circle", "the blue"], to="image", decoding="masked", steps=4, seed=3,
                        sampling=SamplingConfig(top_k=20))
    assert all(x.tokens.numel() == 16 and x.value.shape == (3, 16, 16) for x in s)
    r = vocab.ranges["image"]
    ref, _ = maskgit_decode(bundle.model, build_prompt(vocab, bundle.tokenizers, "a red circle", "image"), 16,
                            mask_id=vocab.mask_id, steps=4, top_k=20, allowed_range=(r.start, r.stop),
                            suffix_ids=[vocab.end_id("image"), vocab.eos_id], seed=3,
                            modality_table=vocab.modality_table())
    assert torch.equal(s[0].tokens, vocab.to_local("image", ref[0]))
    rc = bundle.generate("a red circle", to="image", decoding="masked", steps=4, recap=True, seed=3)
    assert rc[0].tokens.numel() == 16
    t = bundle.generate("a small", to="text", decoding="masked", steps=3, max_new_tokens=6)
    assert t[0].tokens.numel() == 6 and isinstance(t[0].value, str)
    with pytest.raises(ValueError, match="'steps'"):
        bundle.generate("x", to="image", decoding="masked", steps=17)
    with pytest.raises(ValueError, match="'decoding'"):
        bundle.generate("x", to="image", decoding="mask")
    with pytest.raises(ValueError, match="cfg_scale"):
        bundle.generate("x", to="image", decoding="masked", cfg_scale=2.0)
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "generate", "--model", export_dir, "--prompt", "a red circle",
                        "--to", "image", "--out", str(tmp_path / "m.png"), "--decode", "masked", "--steps", "4",
                        "--recap", "--no-progress"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_output(str(tmp_path / "m.png"), "image").shape == (3, 16, 16)
