"""`mmfm demo` (default) / `mmfm demo e2e`: the main job, end to end on a CPU.

    1. corpus      mmfm data demo (six modalities) into <out>/corpus, unless it is there already
    2. tokenizers  the small tokenizer configs shipped with mmfm (configs/tokenizers/*_small.yaml), trained briefly
                   (shortened by the preset below) into <out>/tokenizers/<modality>
    3. tokens      every corpus sample -> [caption/transcript] + modality tokens through the trained
                   tokenizers and mmfm/vocab.py -> token shards <out>/tokens/{train,eval}-*.tar and
                   <out>/tokens/vocab.json (held-out split by key hash, as the tokenizers use)
    4. pretrain    configs/pretrain/demo.yaml (small model, ZeRO-2) -> <out>/pretrain
    5. export      <out>/export (safetensors, config.json, vocab, tokenizers), loaded back with
                   mmfm.load to check it
    6. samples     mmfm.generate on the export: a text continuation of a prompt, and an image, audio
                   clip, video, 3D shape and physics field each conditioned on a held-out caption,
                   into <out>/samples/ (PNG, WAV, MP4, PLY + PNG, NPZ + PNG; listed in samples.json)
    7. eval        mmfm eval prompts on the export (mmfm.eval): does each modality follow its held-out
                   prompts, beside chance and the scorer's ceiling -> <out>/eval-prompts.json
and a summary: what was written, per-modality held-out losses at the start and at the end, the
prompt-following table.

Every stage is skipped when its output already exists, so a second run only re-trains what is
missing (pretraining resumes from its last checkpoint). `--preset test` is the same pipeline at toy
sizes for tests/test_demo_e2e.py.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

from mmfm.jsonio import write_json

MODALITIES = ("text", "image", "audio", "video", "shape3d", "physics")

# modality -> (tokenizer config shipped with mmfm, overrides "section.field" -> value) per preset
TOKENIZERS = {
    "text": ("tokenizers/text_bpe_small.yaml", {}),
    "image": ("tokenizers/image_conv_vq_small.yaml", {}),
    "audio": ("tokenizers/audio_codec_small.yaml", {}),
    "video": ("tokenizers/video_small.yaml", {}),
    "shape3d": ("tokenizers/shape3d_small.yaml", {}),
    # 4 frames (256 tokens per trajectory) instead of 16 (1024), so physics does not swamp the mix;
    # every 5th saved frame, so the 4 span the whole run: from 2 given frames the next 2 are a forecast
    # that persistence (repeat the last frame: rel L2 0.28) does not already win (0.08 at stride 1)
    "physics": ("tokenizers/physics_small.yaml", {"model.frames": 4, "model.frame_stride": 5}),
}
PRETRAIN_CONFIG = "pretrain/demo.yaml"   # shipped with mmfm too (mmfm.typed_config.packaged_config)

PRESETS = {
    # the real demo (docs/training.md, "Why the demo model did not follow prompts", says what each
    # choice bought). The corpus: many more scenes, clips, shapes and heat runs than documents (they
    # cost seconds to render or solve): on the scale-0.5 corpus (760 images, 100 clips, 100 shapes,
    # 4 usable physics runs) the model memorised its samples (held-out image loss rose from step 400
    # on). Tokenizers: the image tokenizer reads every image (a scene's colour must survive its round
    # trip) for 600 steps (its scene-colour ceiling read 0.97 at 800); shape3d 400 steps with its
    # encoder on 256 of the 512 points (the encoder attends over every point: 61 s and a primitive
    # ceiling of 0.85 against 95 s and 0.84 for 280 steps on 512; "Sixth round");
    # video 800 (direction ceiling ~0.92); physics 700 (round trip ~0.08 rel L2 at 900); the
    # audio codec 100 (audio is no prompt-following target: the time goes to pretraining instead).
    "demo": {"scale": 0.5,
             # 4,000 scenes: the held-out image loss sat 0.45 nats above the training loss with 2,250
             # (memorised scenes), and scene colour stayed at 0.42-0.54 whatever the steps, mix or
             # guidance; with 4,000 it read 0.78 (ceiling 0.89). 1,500 digits keep the digits' share of
             # the image samples up (with 1,250 among 4,000 scenes digits fell to 0.55; "Sixth round")
             "corpus_counts": {"digits": 1500, "scenes": 4000, "clips": 1000, "shapes": 800, "physics": 240,
                               "heat": 400, "tones": 200},
             "tokenizer_steps": {**{m: 0 for m in MODALITIES}, "audio": 100, "image": 600, "shape3d": 400,
                                 "video": 800, "physics": 700},
             # the image tokenizer's local encoder (per-pixel norm, replicate padding): one background
             # colour is one token everywhere, not 2-3 codes by position and image ("Fourth round");
             # image and video weigh object pixels 5x in the loss, so a small object keeps its colour
             # through the round trip (clip colour 0.18 -> 0.80, direction 0.80 -> 1.00; for images
             # within seed noise); video at 125 FSQ codes, not 1,000 ("Fifth round")
             # text: every sample (max_samples 0): the first 400 of the shards, read in name order,
             # were audio and image captions only, so the documents were cut into 39% more tokens
             # (1.63 bytes per token on held-out documents, 2.26 when the documents are in)
             "tokenizer_overrides": {"text": {"model.vocab_size": 1000, "data.max_samples": 0},
                                     "image": {"data.max_samples": 4000, "model.norm": "channel",
                                               "model.padding": "replicate", "model.object_weight": 4.0},
                                     "video": {"model.object_weight": 4.0, "model.fsq_levels": [5, 5, 5]},
                                     "shape3d": {"model.num_points": 256}},
             "max_samples": 400, "tokenizer_workers": 2,
             "pretrain_config": PRETRAIN_CONFIG, "pretrain_overrides": [],
             "eval_n": 100},   # one standard error ~0.05 (0.07 at 50): the targets sit near the scores
    # about an hour on 2 cores: the demo's recipe (its tokenizer settings, guidance and mix; "Sixth
    # round") on twice its corpus (8,000 scenes: more scenes, not more steps, lifted scene colour),
    # tokenizer schedules ~2x the demo's, and a 192 x 6 model (~3x the demo's) for 2.5x its steps
    # (configs/pretrain/demo_long.yaml); the prompt-following scorers run every train.eval_every steps
    # (train_eval_n prompts per task), so metrics.jsonl holds quality against compute
    # (docs/benchmarks.md, "eval prompts": the curve of one run)
    "long": {"scale": 1.0,
             "corpus_counts": {"digits": 3000, "scenes": 8000, "clips": 2000, "shapes": 1600, "physics": 480,
                               "heat": 800, "tones": 400},
             "tokenizer_steps": {**{m: 0 for m in MODALITIES}, "audio": 300, "image": 1200, "shape3d": 800,
                                 "video": 1500, "physics": 1500},
             "tokenizer_overrides": {"text": {"model.vocab_size": 1000, "data.max_samples": 0},
                                     "image": {"data.max_samples": 12000, "model.norm": "channel",
                                               "model.padding": "replicate", "model.object_weight": 4.0},
                                     "video": {"model.object_weight": 4.0, "model.fsq_levels": [5, 5, 5]},
                                     "shape3d": {"model.num_points": 256}},
             "max_samples": 800, "tokenizer_workers": 2,
             "pretrain_config": "pretrain/demo_long.yaml", "pretrain_overrides": [], "eval_n": 100,
             "train_eval_n": 30},
    # tests: the same stages at toy sizes
    "test": {"scale": 0.02, "tokenizer_steps": {"text": 0, "image": 3, "audio": 2, "video": 2, "shape3d": 2,
                                                "physics": 2},
             "tokenizer_overrides": {"text": {"model.vocab_size": 600}, "physics": {"model.refine_steps": 1},
                                     "audio": {"train.batch_size": 4}, "video": {"train.batch_size": 4},
                                     "shape3d": {"train.batch_size": 4}},
             "max_samples": 40, "tokenizer_workers": 2, "pretrain_config": PRETRAIN_CONFIG,
             "pretrain_overrides": ["model.dim=64", "model.n_layers=2", "model.ffn_hidden=172", "train.steps=30", "train.micro_batch=4",
                                    "data.seq_len=128", "optim.warmup_steps=3", "train.checkpoint_every=15",
                                    "data.eval_sequences=8", "train.progress=false", "train.plot=false"],
             "eval_n": 0},   # the eval has its own tests (tests/test_eval_prompts.py); a 0.02-scale corpus has no prompt sets
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _set(cfg, dotted: str, value) -> None:
    section, field = dotted.split(".", 1)
    obj = getattr(cfg, section)
    if not hasattr(obj, field):
        raise ValueError(f"demo preset: {dotted}: no such field")
    setattr(obj, field, value)


# ------------------------------------------------------------------------------------ stage 1
def build_corpus(out: str, scale: float, counts: dict | None = None) -> str:
    corpus = os.path.join(out, "corpus")
    if os.path.exists(os.path.join(corpus, "demo-summary.json")):
        _say(f"[demo] corpus: reusing {corpus}")
        return corpus
    from mmfm.data.demo_corpus import build_demo

    _say(f"[demo] corpus: building the six-modality demo corpus at scale {scale} into {corpus}")
    os.makedirs(corpus, exist_ok=True)
    build_demo(corpus, scale=scale, progress=False, counts=counts)
    return corpus


# ------------------------------------------------------------------------------------ stage 2
def tokenizer_config(modality: str, corpus: str, out: str, preset: dict):
    from mmfm.tokenizers.config import load_config
    from mmfm.typed_config import packaged_config

    path, overrides = TOKENIZERS[modality]
    cfg = load_config(packaged_config(path))
    cfg.data.shards = os.path.join(corpus, f"{modality}-*.tar")
    if modality == "text":   # documents and every other modality's captions and transcripts
        cfg.data.shards, cfg.data.modality = os.path.join(corpus, "*-*.tar"), ""
    cfg.train.out = os.path.join(out, "tokenizers", modality)
    steps = preset["tokenizer_steps"][modality]
    if steps:
        cfg.train.steps = steps
        cfg.train.checkpoint_every = steps
        cfg.train.log_every = max(1, steps // 4)
    cfg.data.max_samples = preset["max_samples"]
    for k, v in {**overrides, **preset["tokenizer_overrides"].get(modality, {})}.items():
        _set(cfg, k, v)
    return cfg


# the neural tokenizers, longest first (seconds in a one-thread worker beside the other on the 2-core
# machine at the demo preset: image 123-185, physics 80-106, shape3d 57-68, video 51-62, audio 45-46),
# so the workers' queues end close together
TRAIN_ORDER = ("image", "physics", "shape3d", "video", "audio")


def _worker_init(threads: int) -> None:
    """A tokenizer worker: its own one-rank gloo group on a free port (not the parent's rendezvous,
    which another worker would share), and its share of the threads."""
    import torch

    for k in ("MASTER_PORT", "MMFM_MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    torch.set_num_threads(threads)


def _train_one(modality: str, corpus: str, out: str, preset: dict) -> None:
    """Train one tokenizer (in this process or a worker) into <out>/tokenizers/<modality>."""
    from mmfm.tokenizers.commands import _train_neural, _train_text, is_text_tokenizer

    cfg = tokenizer_config(modality, corpus, out, preset)
    folder = os.path.join(cfg.train.out, "tokenizer")
    t0 = time.perf_counter()
    _say(f"[demo] tokenizer {modality}: {cfg.tokenizer}"
         + ("" if modality == "text" else f", {cfg.train.steps} steps") + f" -> {folder}")
    os.makedirs(cfg.train.out, exist_ok=True)
    rc = _train_text(cfg) if is_text_tokenizer(cfg.tokenizer) else _train_neural(cfg, progress=False)
    if rc != 0:
        raise RuntimeError(f"demo: training the {modality} tokenizer failed (status {rc})")
    _say(f"[demo] tokenizer {modality}: {time.perf_counter() - t0:.0f} s")


def train_tokenizers(corpus: str, out: str, preset: dict, workers: int | None = None) -> dict:
    """{modality: saved tokenizer folder}; trains those not saved yet.

    workers > 1 trains the neural tokenizers in that many processes at once, the torch threads split
    between them: most of these small models use a second thread poorly (the image tokenizer: 106 s at
    2 threads, 136-160 s at 1), so on 2 cores the demo's stage took 241-257 s in two one-thread
    workers against 326 s in one two-thread loop. Each worker is a fresh (spawned) process with its
    own one-rank gloo group."""
    import torch

    workers = preset.get("tokenizer_workers", 1) if workers is None else workers
    saved, todo = {}, []
    for m in MODALITIES:
        cfg = tokenizer_config(m, corpus, out, preset)
        saved[m] = os.path.join(cfg.train.out, "tokenizer")
        if not os.path.exists(os.path.join(saved[m], "tokenizer.yaml")):
            todo.append(m)
    if "text" in todo:   # sentencepiece: seconds, in this process
        _train_one("text", corpus, out, preset)
        todo.remove("text")
    todo.sort(key=lambda m: TRAIN_ORDER.index(m) if m in TRAIN_ORDER else len(TRAIN_ORDER))
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for m in todo:
            _train_one(m, corpus, out, preset)
        return saved
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        jobs = {m: pool.submit(_train_one, m, corpus, out, preset) for m in todo}
        for m, job in jobs.items():
            job.result()   # a worker's error is raised here, naming the modality in its message
    return saved


# ------------------------------------------------------------------------------------ stage 3
def build_vocab(tokenizers: dict):
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.vocab import Vocab

    toks = {m: load_tokenizer(p) for m, p in tokenizers.items()}
    vocab = Vocab(toks["text"].vocab_size, {m: toks[m].vocab_size for m in MODALITIES if m != "text" and m in toks})
    return vocab, toks


def tokenize_corpus(corpus: str, tokenizers: dict, out_dir: str, holdout_fraction: float = 0.1,
                    max_text_tokens: int = 512) -> dict:
    """Raw demo shards -> token shards through the trained tokenizers and the unified vocabulary:
    the rows of `mmfm tokenize` (mmfm.tokenizers.pretokenize.token_rows: the caption or transcript
    first, so the model learns to continue text into the modality), held out by key hash and
    interleaved across modalities in one pass. Samples a tokenizer cannot take (e.g. 1D Burgers
    trajectories for the 2D physics tokenizer) are counted and skipped. Only the modalities of
    `tokenizers` are read (text is required): {"text": folder} gives a text-only token set
    (tools/superbpe_bpb.py). Returns a report."""
    import torch

    from mmfm.tokenizers.data import is_held_out, read_samples
    from mmfm.tokenizers.pretokenize import token_rows
    from mmfm.train.tokens import write_token_shards

    done = os.path.join(out_dir, "tokens-report.json")
    if os.path.exists(done):
        _say(f"[demo] tokens: reusing {out_dir}")
        with open(done) as f:
            return json.load(f)
    vocab, toks = build_vocab(tokenizers)
    rows = {"train": [], "eval": []}
    modalities = [m for m in MODALITIES if m in toks]
    report = {m: {"samples": 0, "skipped": 0, "tokens": 0} for m in modalities}
    for m in modalities:
        samples = read_samples(os.path.join(corpus, f"{m}-*.tar"), m, "all")

        def skip(_why: str, m=m) -> None:
            report[m]["skipped"] += 1

        for key, ids, meta in token_rows(samples, m, toks[m], toks["text"], vocab, batch_size=32,
                                         max_text_tokens=max_text_tokens, source="mmfm demo e2e", skip=skip):
            split = "eval" if is_held_out(key, holdout_fraction) else "train"
            rows[split].append((key, ids, meta))
            report[m]["samples"] += 1
            report[m]["tokens"] += int(len(ids))
    # interleave modalities in the shards (a fixed shuffle), so shard order carries no modality blocks
    g = torch.Generator().manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    shards = {}
    for split, items in rows.items():
        order = torch.randperm(len(items), generator=g).tolist()
        shards[split] = write_token_shards((items[k] for k in order), out_dir, prefix=split, shard_size=500)
    vocab.save(os.path.join(out_dir, "vocab.json"))
    report = {"modalities": report, "vocab_size": vocab.size, "train_samples": len(rows["train"]),
              "eval_samples": len(rows["eval"]), "shards": {k: len(v) for k, v in shards.items()}}
    write_json(done, report)
    return report


# ------------------------------------------------------------------------------------ stages 4-5
def pretrain_config(out: str, preset: dict, extra: list[str]):
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import packaged_config

    tokens = os.path.join(out, "tokens")
    overrides = [f"data.shards={tokens}/train-*.tar", f"data.eval_shards={tokens}/eval-*.tar",
                 f"data.vocab={tokens}/vocab.json", f"train.out={os.path.join(out, 'pretrain')}"]
    # the config names its model and DeepSpeed files relative to itself: no working directory needed
    cfg = load_run_config(packaged_config(preset["pretrain_config"]), overrides + preset["pretrain_overrides"] + extra)
    if cfg.data.mix:   # a small corpus (--scale, the test preset) can lack a modality in its train split
        from mmfm.train.tokens import modality_counts

        have = modality_counts(cfg.data.shards)
        missing = [m for m in cfg.data.mix if not have.get(m)]
        if missing:
            _say(f"[demo] pretrain: no training samples of {', '.join(missing)}: left out of data.mix")
            cfg.data.mix = {m: w for m, w in cfg.data.mix.items() if have.get(m)}
    if preset.get("train_eval_n"):   # the prompt-following scorers at every train.eval_every (mmfm.eval.training)
        p = cfg.eval_prompts
        p.n, p.corpus, p.tokenizers = preset["train_eval_n"], os.path.join(out, "corpus"), os.path.join(out, "tokenizers")
        p.cache_dir = os.path.join(out, "eval-scorers")
        p.cfg_scale, p.cfg_by_modality = CFG_SCALE, dict(CFG_BY_MODALITY)
    return cfg


# ------------------------------------------------------------------------------------ stage 6
TEXT_PROMPT = "The"
# classifier-free guidance (the model is trained for it: data.caption_dropout in demo.yaml). On the
# scale-0.5 corpus it lowered every score; on the demo's corpus now, guidance 2 doubled the digit score
# (0.36 -> 0.72) and raised video direction and the 3D primitive (docs/training.md). Tones are the
# exception: every step of guidance lowered the tone score (E3 export, n = 100: 0.32 at 1, 0.21 at 2,
# 0.12 at 3), so audio is sampled unguided. Video and 3D now do better with less: on three exports
# of the recipe (n = 100, two sampling seeds each) video direction was 0.55-0.73 at guidance 2 and
# 0.77-0.90 unguided, the 3D primitive 0.50 at 2 and 0.56 at 1.5 on average (docs/training.md,
# "Sixth round").
CFG_SCALE = 2.0
CFG_BY_MODALITY = {"audio": 1.0, "video": 1.0, "shape3d": 1.5}


def guidance(modality: str) -> float:
    return 1.0 if modality == "text" else CFG_BY_MODALITY.get(modality, CFG_SCALE)


def guidance_label() -> str:
    return f"{CFG_SCALE:g}" + "".join(f", {m} {v:g}" for m, v in CFG_BY_MODALITY.items())

SAMPLE_SETTINGS = dict(temperature=0.9, top_k=100)   # SamplingConfig fields


def _caption(corpus: str, modality: str) -> str:
    """A caption of the modality's corpus (the first held-out one when there is one)."""
    from mmfm.tokenizers.data import is_held_out, read_samples

    samples = [s for s in read_samples(os.path.join(corpus, f"{modality}-*.tar"), modality, "all")
               if isinstance(s.get("txt"), str) and s["txt"]]
    held = [s for s in samples if is_held_out(s["__key__"], 0.1)]
    return (held or samples)[0]["txt"] if samples else ""


def generate_samples(export_dir: str, corpus: str, out: str) -> list[dict]:
    """One generated sample per modality into <out>/samples; reuses samples.json when present."""
    from mmfm.generate import Bundle, SamplingConfig

    folder = os.path.join(out, "samples")
    index = os.path.join(folder, "samples.json")
    if os.path.exists(index):
        _say(f"[demo] samples: reusing {folder}")
        with open(index) as f:
            return json.load(f)
    bundle = Bundle.load(export_dir)
    rows = []
    for m in MODALITIES:
        t = time.perf_counter()
        prompt = TEXT_PROMPT if m == "text" else _caption(corpus, m)
        kw = dict(cfg_scale=1.0, max_new_tokens=48) if m == "text" else dict(cfg_scale=guidance(m))
        s = bundle.generate(prompt, m, out=os.path.join(folder, m), sampling=SamplingConfig(**SAMPLE_SETTINGS),
                            seed=0, **kw)[0]
        rows.append({"modality": m, "prompt": prompt, "paths": s.paths, "tokens": int(s.tokens.numel()),
                     "seconds": round(time.perf_counter() - t, 2), **({"text": s.value} if m == "text" else {})})
        _say(f"[demo] samples: {m} <- {prompt[:60]!r}: {', '.join(s.paths)}")
    os.makedirs(folder, exist_ok=True)
    write_json(index, rows)
    return rows


def eval_prompts(export_dir: str, corpus: str, out: str, n: int) -> dict:
    """mmfm eval prompts on the export (mmfm.eval), with the demo's sampling and guidance; reuses
    <out>/eval-prompts.json when present. Returns {"records", "table", "notes"}."""
    from mmfm.eval import EvalConfig, Sampling, evaluate
    from mmfm.eval.commands import table

    path = os.path.join(out, "eval-prompts.json")
    if os.path.exists(path):
        _say(f"[demo] eval: reusing {path}")
        with open(path) as f:
            records = json.load(f)
        return {"records": records, "table": table(records), "notes": []}
    cfg = EvalConfig(n=n, sampling=Sampling(temperature=SAMPLE_SETTINGS["temperature"], top_k=SAMPLE_SETTINGS["top_k"],
                                            cfg_scale=CFG_SCALE, cfg_by_modality=dict(CFG_BY_MODALITY), seed=0))
    ev = evaluate(export_dir, corpus, n=n, json=path, cache_dir=os.path.join(out, "eval-scorers"), config=cfg)
    return {"records": ev.records, "table": table(ev.records), "notes": list(ev.notes)}


def _losses(ev: dict | None) -> dict:
    return {("all" if k == "eval_loss" else k[len("eval_loss_"):]): v for k, v in (ev or {}).items()
            if k.startswith("eval_loss")}


def main(args) -> int:
    t_start = time.perf_counter()
    preset = PRESETS[args.preset]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    times = {}
    t = time.perf_counter()
    corpus = build_corpus(out, args.scale if args.scale is not None else preset["scale"],
                          None if args.scale is not None else preset.get("corpus_counts"))
    times["corpus"] = time.perf_counter() - t
    t = time.perf_counter()
    tokenizers = train_tokenizers(corpus, out, preset)
    times["tokenizers"] = time.perf_counter() - t
    t = time.perf_counter()
    report = tokenize_corpus(corpus, tokenizers, os.path.join(out, "tokens"))
    times["tokens"] = time.perf_counter() - t
    _say(f"[demo] tokens: {report['train_samples']} train / {report['eval_samples']} held-out samples, "
         f"vocabulary {report['vocab_size']}")

    from mmfm.train.loop import run

    from mmfm.eval.training import evaluators_for

    cfg = pretrain_config(out, preset, list(args.override or []))
    t = time.perf_counter()
    res = run(cfg, evaluators=evaluators_for(cfg))
    times["pretrain"] = time.perf_counter() - t
    if torch.distributed.get_rank() != 0:
        return 0
    from mmfm.export import export, load

    t = time.perf_counter()
    # <out>/tokenizers/<m>/tokenizer/: export copies the saved tokenizers, not the training runs around them
    export_dir = export(res["out"], os.path.join(out, "export"), os.path.join(out, "tokenizers"))
    model = load(export_dir)
    times["export"] = time.perf_counter() - t
    t = time.perf_counter()
    samples = generate_samples(export_dir, corpus, out)
    times["samples"] = time.perf_counter() - t
    prompt_eval = None
    if preset.get("eval_n"):
        t = time.perf_counter()
        prompt_eval = eval_prompts(export_dir, corpus, out, preset["eval_n"])
        times["eval"] = time.perf_counter() - t

    start, end = _losses(res["eval_start"]), _losses(res["eval_end"])
    if not res["eval_start"]:   # a resumed run that had already finished: read the first eval back
        with open(os.path.join(res["out"], "metrics.jsonl")) as f:
            evs = [json.loads(line) for line in f if "eval_loss" in line]
        start = _losses(evs[0]) if evs else {}
    total = time.perf_counter() - t_start
    losses = res["losses"]
    steps = sorted(losses)
    summary = {
        "corpus": corpus, "tokenizers": tokenizers, "tokenizers_dir": os.path.join(out, "tokenizers"), "tokens": os.path.join(out, "tokens"),
        "checkpoint": os.path.join(res["out"], "checkpoints"), "metrics": os.path.join(res["out"], "metrics.jsonl"),
        "export": export_dir, "export_params": sum(p.numel() for p in model.parameters()),
        "steps": res["step"], "zero_stage": cfg.deepspeed.get("zero_optimization", {}).get("stage"),
        "train_loss_first": losses[steps[0]] if steps else None, "train_loss_last": losses[steps[-1]] if steps else None,
        "heldout_start": start, "heldout_end": end, "token_report": report, "samples": samples,
        "eval_prompts": prompt_eval and {"json": os.path.join(out, "eval-prompts.json"), "table": prompt_eval["table"],
                                         "notes": prompt_eval["notes"]},
        "seconds": {k: round(v, 1) for k, v in {**times, "total": total}.items()},
    }
    write_json(os.path.join(out, "demo-summary.json"), summary)
    print_summary(summary)
    fell = bool(start) and bool(end) and end.get("all", 1e9) < start.get("all", -1)
    if not fell:
        print("demo: the held-out loss did NOT fall", file=sys.stderr)
        return 1
    return 0


def print_summary(s: dict) -> None:
    rep = s["token_report"]
    print(f"\nmmfm demo: done in {s['seconds']['total']:.0f} s "
          + "(" + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items() if k != "total") + ")")
    print(f"  corpus      {s['corpus']}")
    print(f"  tokenizers  {s['tokenizers_dir']}/<modality>/tokenizer: " + ", ".join(s["tokenizers"]))
    print(f"  tokens      {s['tokens']}: {rep['train_samples']} train + {rep['eval_samples']} held-out samples, "
          f"vocabulary {rep['vocab_size']}; " + ", ".join(f"{m} {v['samples']} ({v['tokens']} tok)"
                                                          for m, v in rep["modalities"].items()))
    print(f"  checkpoint  {s['checkpoint']} (ZeRO-{s['zero_stage']}, {s['steps']} steps; metrics {s['metrics']})")
    print(f"  export      {s['export']} ({s['export_params'] / 1e6:.2f} M parameters; loads with mmfm.load)")
    print(f"  train loss  {s['train_loss_first']:.3f} (step 1) -> {s['train_loss_last']:.3f} (step {s['steps']})")
    print("  held-out loss per modality, start -> end:")
    for k in sorted(s["heldout_end"], key=lambda k: (k == "all", k)):
        a, b = s["heldout_start"].get(k), s["heldout_end"][k]
        print(f"    {k:<9} {a if a is None else f'{a:.3f}':>7} -> {b:.3f}")
    print(f"  samples     {os.path.dirname(s['samples'][0]['paths'][0]) if s.get('samples') else '-'} (mmfm generate, "
          f"one per modality):")
    for row in s.get("samples", []):
        what = f"{row['text']!r}" if row["modality"] == "text" else ", ".join(os.path.basename(p) for p in row["paths"])
        print(f"    {row['modality']:<9} {row['prompt'][:40]!r} -> {what[:80]}")
    if s.get("eval_prompts"):
        print(f"  prompt following (mmfm eval prompts, cfg_scale {guidance_label()}; {s['eval_prompts']['json']}):")
        for line in s["eval_prompts"]["table"].splitlines():
            print(f"    {line}")
        for note in s["eval_prompts"]["notes"]:
            print(f"    note: {note}")
