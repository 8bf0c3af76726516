"""mmfm eval prompts (mmfm/eval): the scorers on a real demo corpus (their ceiling on real samples,
chance on shuffled labels), the command and the Python API on a tiny export, and bad input.
The corpus is the real demo corpus at scale 0.5; the export has real, untrained tokenizers."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmfm.eval.cache import fit_scorer
from mmfm.eval.promptsets import Corpus, build_set
from mmfm.eval.runner import chance
from mmfm.eval.scorers.audio import as_wave
from mmfm.eval.scorers.image import as_image
from mmfm.eval.scorers.shape3d import as_points
from mmfm.eval.scorers.video import as_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = {"digits": as_image, "scenes": as_image, "tones": as_wave, "shapes": as_points, "clips": as_video}
FITTED_TASK = {"digits": "digit", "scenes": "shape", "tones": "tone", "shapes": "primitive"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from mmfm.data.demo_corpus import build_demo

    root = tmp_path_factory.mktemp("evalprompts")
    build_demo(str(root / "corpus"), scale=0.5, progress=False)
    return root


def _values(name, ps):
    return [CONVERT[name](it.sample) for it in ps.items]


@pytest.mark.parametrize("name", ["digits", "scenes", "tones", "shapes", "clips"])
def test_scorer_reaches_its_ceiling_on_real_samples_and_chance_on_shuffled_labels(root, name):
    corpus = Corpus(str(root / "corpus"))
    ps = build_set(corpus, name, 40)
    assert len(ps.items) == 40 and {it.source for it in ps.items} <= {"held-out", "fresh"}
    sc = fit_scorer(name, ps.train)
    values = _values(name, ps)
    pred = sc.predict(values)
    for task in ps.tasks:
        want = [it.labels[task] for it in ps.items]
        acc = np.mean([p == w for p, w in zip(pred[task], want)])
        assert acc >= 0.9, (name, task, acc)
        # the same predictions against shuffled labels: chance, so the scorer reads the sample
        rng = np.random.default_rng(0)
        shuffled = np.mean([np.mean([p == w for p, w in zip(pred[task], rng.permutation(want))]) for _ in range(5)])
        c = chance([lab[task] for _, lab in ps.train], want)
        assert shuffled < c + 0.15 and shuffled < acc - 0.4, (name, task, shuffled, c)
    if name in FITTED_TASK:   # fitted on shuffled training labels, a scorer learns nothing: chance again
        task = FITTED_TASK[name]
        want = [it.labels[task] for it in ps.items]
        accs = []
        for seed in range(3):
            labs = [lab[task] for _, lab in ps.train]
            perm = np.random.default_rng(seed).permutation(len(labs))
            train = [(s, {task: labs[j]}) for (s, _), j in zip(ps.train, perm)]
            p = fit_scorer(name, train).predict(values)[task]
            accs.append(np.mean([a == b for a, b in zip(p, want)]))
        c = chance([lab[task] for _, lab in ps.train], want)
        assert np.mean(accs) < c + 0.2, (name, accs, c)


# ------------------------------------------------------------------ a tiny export beside the corpus
def build_export(root, modalities=("image", "audio", "video", "shape3d", "physics"), name="export") -> str:
    from mmfm.export import write_folder
    from mmfm.models import ModelConfig, Transformer
    from mmfm.tokenizers import build_tokenizer
    from mmfm.tokenizers.audio import AudioConfig
    from mmfm.tokenizers.data import read_samples
    from mmfm.tokenizers.image import ImageConvConfig
    from mmfm.tokenizers.physics import PhysicsConfig
    from mmfm.tokenizers.shape3d import Shape3DConfig
    from mmfm.tokenizers.text import TextConfig, TextTokenizer
    from mmfm.tokenizers.video import VideoConfig
    from mmfm.vocab import Vocab

    configs = {   # demo shapes (32 px images, 0.5 s of 16 kHz audio, 64 x 64 fields), toy widths
        "image": ("image_conv", ImageConvConfig(image_size=32, channels=8, downsamples=2, codebook_size=32)),
        "audio": ("audio_codec", AudioConfig(clip_samples=8000, channels=8, latent_dim=8, codebook_size=32,
                                             num_levels=2)),
        "video": ("video", VideoConfig(frames=5, image_size=16, width=16, depth=1, heads=2, fsq_levels=[4, 4])),
        "shape3d": ("shape3d", Shape3DConfig(num_points=64, out_points=64, width=16, depth=1, heads=2, num_queries=4,
                                             latent_dim=8, codebook_size=32, scales=[1, 2, 4])),
        "physics": ("physics", PhysicsConfig(grid=64, frames=2, width=8, patch=4, downsamples=2, fsq_levels=[4, 4],
                                             refine_width=8)),
    }
    torch.manual_seed(0)
    toks = {m: build_tokenizer(*configs[m]) for m in modalities}
    texts = [s["txt"] for m in ("image", "audio", "video", "shape3d", "physics")   # captions: few characters
             for s in read_samples(str(root / "corpus" / f"{m}-*.tar")) if isinstance(s.get("txt"), str)]
    toks["text"] = TextTokenizer(TextConfig(vocab_size=400)).fit(texts)
    tok_dir = str(root / f"{name}-tokenizers")
    for m, t in toks.items():
        t.save(os.path.join(tok_dir, m))
    vocab = Vocab(toks["text"].vocab_size, {m: toks[m].vocab_size for m in modalities})
    vocab.save(str(root / f"{name}-vocab.json"))
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab.size,
                                    max_seq_len=512))
    return write_folder(model.state_dict(), model.cfg, str(root / name), str(root / f"{name}-vocab.json"), tok_dir)


@pytest.fixture(scope="module")
def export(root):
    return build_export(root)


def test_cli_on_a_tiny_export_writes_records_for_every_modality(root, export, tmp_path):
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "eval", "prompts", "--model", export, "--json", str(out),
                        "--n", "6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert all(r["bench"] == "eval_prompts" and set(r["case"]) == {"modality", "task"} for r in recs)
    cases = {(r["case"]["modality"], r["case"]["task"]) for r in recs}
    assert cases == {("image", "digit"), ("image", "scene_colour"), ("image", "scene_shape"),
                     ("image", "scene_position"), ("video", "colour"), ("video", "direction"), ("audio", "tone"),
                     ("shape3d", "primitive"), ("physics", "continuation"), ("text", "perplexity")}
    by = {(r["case"]["task"], r["impl"]): r for r in recs}
    assert by[("digit", "chance")]["accuracy"] == pytest.approx(0.1, abs=0.08)
    assert by[("digit", "mmfm")]["n"] == 6 and 0 <= by[("digit", "mmfm")]["accuracy"] <= 1
    assert by[("digit", "ceiling")]["accuracy_raw"] >= 0.8   # raw digits: the scorer's own ceiling
    assert {impl for (task, impl) in by if task == "continuation"} == {"mmfm", "repeat_last", "mean_field", "ceiling"}
    assert {impl for (task, impl) in by if task == "perplexity"} == {"mmfm", "bigram"}
    # an untrained model's text is far worse than a bigram fitted on the training text
    assert by[("perplexity", "mmfm")]["ppl"] > by[("perplexity", "bigram")]["ppl"]
    for line in ("digit", "scene_colour", "continuation", "perplexity", "repeat_last", "bigram"):
        assert line in p.stdout
    # the fitted scorers were cached next to the corpus, keyed by the corpus
    cached = os.listdir(root / "corpus" / ".scorers")
    assert len(cached) == 1
    assert sorted(f.split("-")[0] for f in os.listdir(root / "corpus" / ".scorers" / cached[0])) == \
        ["digits", "scenes", "shapes", "tones"]


def test_prompt_eval_runs_an_in_memory_model_and_repeats(root, export):
    """The API training calls every train.eval_every steps: built once, run on a Transformer."""
    from mmfm.eval import EvalConfig, PromptEval
    from mmfm.generate import Bundle

    b = Bundle.load(export)
    ev = PromptEval(str(root / "corpus"), b.vocab, b.tokenizers, n=4, modalities=["image", "physics", "text"],
                    config=EvalConfig(text_docs=3))
    b.model.train()
    m1 = ev.run(b.model)
    assert b.model.training      # left as it was found
    assert set(m1) == {"image/digit", "image/scene_colour", "image/scene_shape", "image/scene_position",
                       "physics/rel_l2", "text/ppl"}
    assert m1 == ev.run(b.model)          # seeded: the same figures twice
    assert all(r["n"] == 4 for r in ev.records if r["case"]["modality"] == "image")


def test_guidance_per_modality_overrides_the_default_for_that_modality_only(root, export):
    """cfg_by_modality picks each generated modality's scale: image unguided under a default of 3
    decodes exactly what cfg_scale 1 decodes, while audio still gets the default's (different) rows."""
    from mmfm.eval import gen
    from mmfm.generate import Bundle

    b = Bundle.load(export)
    toks = gen.as_tokenizers(b.tokenizers, b.vocab)

    def run(to, caption, **kw):
        ids = [gen.prompt_ids(b.vocab, toks, caption, to)] * 6
        return gen.generate_tokens(b.model, b.vocab, ids, to, 12, gen.Sampling(seed=3, **kw))

    per = dict(cfg_scale=3.0, cfg_by_modality={"image": 1.0})
    assert torch.equal(run("image", "a handwritten digit 3", **per), run("image", "a handwritten digit 3"))
    assert torch.equal(run("audio", "a tone", **per), run("audio", "a tone", cfg_scale=3.0))
    assert not torch.equal(run("audio", "a tone", cfg_scale=3.0), run("audio", "a tone"))


@pytest.mark.parametrize("items, want", [
    (None, (1.0, {})), (["2"], (2.0, {})), (["2", "audio=1", "image=3.5"], (2.0, {"audio": 1.0, "image": 3.5})),
    (["audio=1", "audio=0"], (1.0, {"audio": 0.0})),
])
def test_parse_guidance(items, want):
    from mmfm.eval.gen import parse_guidance

    assert parse_guidance(items, ("image", "audio")) == want


@pytest.mark.parametrize("item, message", [
    ("two", "--cfg-scale: 'two' is not a number or MODALITY=NUMBER"),
    ("smell=2", "--cfg-scale: 'smell=2': unknown modality 'smell'; expected one of image, audio"),
    ("-1", "--cfg-scale: '-1': the scale must be >= 0"),
])
def test_parse_guidance_names_the_bad_item(item, message):
    from mmfm.eval.gen import parse_guidance

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_guidance(["2", item], ("image", "audio"))


def test_bad_input_names_what_is_wrong(root, export, tmp_path):
    import mmfm.eval

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    not_export = tmp_path / "plain"
    not_export.mkdir()
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "eval", "prompts", "--model", str(not_export)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and str(not_export) in p.stderr and "mmfm_model.json" in p.stderr, p.stderr
    with pytest.raises(FileNotFoundError, match="--corpus"):
        mmfm.eval.prompts(export, corpus=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        mmfm.eval.prompts(export, modalities=["smell"], n=2)
    lean = build_export(root, modalities=("image",), name="lean_export")
    with pytest.raises(ValueError, match="no 'audio' modality"):
        mmfm.eval.prompts(lean, modalities=["audio"], n=2)
    with pytest.raises(ValueError, match="'n'"):
        mmfm.eval.prompts(export, n=0)


def test_eval_prompts_continue_exactly_where_the_training_samples_go_on(root, export, tmp_path):
    """The prompt the eval builds, followed by the real sample's tokens, is the training sequence
    `mmfm demo e2e` writes for that held-out sample, id for id: a misaligned caption, a missing
    marker or another vocabulary would make the eval measure a layout the model never saw."""
    import glob
    import io
    import tarfile

    from mmfm.demos.e2e import tokenize_corpus
    from mmfm.eval.gen import load_export, prompt_ids

    _, vocab, toks = load_export(export)
    folders = {m: str(root / "export-tokenizers" / m) for m in ("text", "image", "audio", "video", "shape3d",
                                                                   "physics")}
    tokenize_corpus(str(root / "corpus"), folders, str(tmp_path / "tokens"))
    written = {}
    for shard in glob.glob(str(tmp_path / "tokens" / "eval-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    written[m.name[:-4]] = np.load(io.BytesIO(tar.extractfile(m).read())).astype(np.int64)
    corpus = Corpus(str(root / "corpus"))
    checked = 0
    for name, modality in (("digits", "image"), ("scenes", "image"), ("tones", "audio"), ("shapes", "shape3d"),
                           ("clips", "video")):
        for it in build_set(corpus, name, 40).items:
            if it.source != "held-out":
                continue
            seg = vocab.to_global(modality, toks[modality].encode_batch([it.sample])[0])
            ids = torch.cat([prompt_ids(vocab, toks, it.prompt, modality), seg,
                             torch.tensor([vocab.end_id(modality), vocab.eos_id])])
            assert ids.tolist() == written[it.sample["__key__"]].tolist(), (name, it.prompt)
            checked += 1
    assert checked >= 30


def test_pretrain_logs_the_prompt_scorers_every_eval_every(root, export, tmp_path):
    """eval_prompts: in a pretrain config runs the scorers at the start, every train.eval_every steps
    and at the end, into metrics.jsonl (issue 12 item 5); a section missing its corpus is refused."""
    from mmfm.demos.e2e import tokenize_corpus

    tok_dir = str(root / "export-tokenizers")
    tokens = tmp_path / "tokens"
    tokenize_corpus(str(root / "corpus"), {m: os.path.join(tok_dir, m) for m in os.listdir(tok_dir)}, str(tokens))
    cfg = tmp_path / "run.yaml"
    body = f"""model: {{dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_hidden: 64, max_seq_len: 512}}
data: {{shards: "{tokens}/train-*.tar", vocab: {tokens}/vocab.json, seq_len: 128, shuffle_buffer: 0}}
optim: {{lr: 1.0e-3, warmup_steps: 1}}
train: {{out: {tmp_path}/run, steps: 4, micro_batch: 2, eval_every: 2, checkpoint_every: 4, progress: false}}
"""
    cfg.write_text(body + f"eval_prompts: {{n: 3, corpus: {root}/corpus, tokenizers: {tok_dir}, "
                          f"modalities: [image, text], cache_dir: {tmp_path}/scorers, cfg_scale: 2.0}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "prompts/image/digit" in r]
    assert [r["step"] for r in scored] == [0, 2, 4]
    for r in scored:
        assert 0 <= r["prompts/image/digit"] <= 1 and 0 <= r["prompts/image/scene_colour"] <= 1
        assert r["prompts/text/ppl"] > 1
    # the eval's inputs are fixed: an untrained model at step 0 and the same model later differ only
    # through training, and two evaluations of step 0's model would agree (seeded; tested above)
    assert not any(k.startswith("prompts/audio") for r in scored for k in r)   # only the named modalities
    from PIL import Image   # the curve a person looks at: one line per accuracy task, drawn at the end

    assert Image.open(tmp_path / "run" / "prompts_curve.png").size == (760, 420)

    cfg.write_text(body + "eval_prompts: {n: 3}\n")
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "pretrain", "--config", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "eval_prompts.corpus: required when eval_prompts.n > 0" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("eval_prompts.n=-1", "eval_prompts.n: must be >= 0"),
    ("eval_prompts.cfg_scale=-1", "eval_prompts.cfg_scale: must be >= 0 (1 = no guidance)"),
    ("eval_prompts.cfg_by_modality={smell: 2}", "eval_prompts.cfg_by_modality: unknown modality 'smell'"),
    ("eval_prompts.cfg_by_modality={audio: -1}", "eval_prompts.cfg_by_modality.audio: must be a number >= 0"),
])
def test_bad_eval_prompts_fields_are_named_before_training(override, message):
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import ConfigError, packaged_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(packaged_config("pretrain/demo.yaml"), [override])


def test_robust_latents_tool_decodes_the_same_generated_tokens_with_every_decoder(root, tmp_path, capsys):
    """tools/robust_latents.py --model: every tokenizer decodes the same generated sequences, so a
    tokenizer listed twice scores identically (paired difference exactly 0), a changed decoder moves
    the Fréchet distance, and a tokenizer whose encoder gives other tokens is refused by name."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import robust_latents

    from mmfm.tokenizers.base import load_tokenizer

    export = build_export(root, modalities=("image",), name="export_img")
    base = os.path.join(export, "tokenizers", "image")
    other = load_tokenizer(base)
    with torch.no_grad():
        for p in other.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save(str(tmp_path / "other"))
    js = tmp_path / "gen.json"
    argv = ["--corpus", str(root / "corpus"), "--model", f"m={export}", "--tokenizer", f"base={base}",
            "--tokenizer", f"same={base}", "--tokenizer", f"other={tmp_path / 'other'}", "--seeds", "0", "1",
            "--n", "6", "--cache-dir", str(tmp_path / "scorers"), "--json", str(js)]
    assert robust_latents.main(argv) == 0
    rows = json.loads(js.read_text())
    by = {(r["tokenizer"], r["task"]): r for r in rows}
    tasks = {r["task"] for r in rows}
    assert {"digits/digit", "scenes/colour", "frechet_pca32"} <= tasks
    for t in tasks:
        assert by["base", t]["minus_base"] == 0 and by["same", t]["minus_base"] == 0
        assert by["same", t].get("accuracy") == by["base", t].get("accuracy")
        assert by["same", t].get("frechet") == by["base", t].get("frechet")
    assert by["base", "digits/digit"]["images"] == 12      # 6 prompts x 2 seeds
    assert by["other", "frechet_pca32"]["frechet"] != by["base", "frechet_pca32"]["frechet"]
    fresh = build_export(root, modalities=("image",), name="export_img2")
    foreign = load_tokenizer(os.path.join(fresh, "tokenizers", "image"))
    torch.manual_seed(5)
    for p in foreign.encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    foreign.save(str(tmp_path / "foreign"))
    capsys.readouterr()
    argv = argv[:argv.index("--tokenizer")] + ["--tokenizer", f"base={base}", "--tokenizer",
                                                f"foreign={tmp_path / 'foreign'}", "--n", "6"]
    assert robust_latents.main(argv) == 2
    assert "--tokenizer foreign: its encoder gives the tokens of --model m's image tokenizer at only" in \
        capsys.readouterr().err
