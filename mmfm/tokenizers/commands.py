"""`mmfm tokenizer train --config X.yaml` and `mmfm tokenizer eval [--config X.yaml ...] [--json PATH]`.

train: reads the config's shards (training split), trains on the DeepSpeed engine (the Trainer,
through mmfm/tokenizers/train.py: progress bar, losses and metrics to <out>/train.jsonl and
TensorBoard <out>/tb, the model's atomic checkpoints in <out>/checkpoints with exact resume), writes
<out>/reconstructions.png (held-out inputs left, reconstructions right), and saves the tokenizer
to <out>/tokenizer. image_1d also writes <out>/psnr_vs_tokens.png.

eval: for each config (default: every configs/tokenizers/*.yaml shipped with mmfm whose <out>/tokenizer
exists, <out> relative to the working directory),
loads the saved tokenizer, reconstructs the held-out split and prints one record per tokenizer
and one per baseline at the same bit budget (mmfm.tokenizers.baselines). Records follow
docs/records.md: bench "tokenizer", case {tokenizer, tokens}, impl "mmfm" or the baseline's name.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys

from mmfm.jsonio import write_json, write_records
from mmfm.typed_config import packaged_config


# primary metric per modality: (name, higher is better)
PRIMARY = {"image": ("psnr", True), "video": ("psnr", True), "audio": ("snr_db", True),
           "physics": ("rel_l2", False), "shape3d": ("chamfer", False), "text": ("bytes_per_token", True)}


def add_tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train and evaluate modality tokenizers (configs/tokenizers/*.yaml)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train one tokenizer from shards and save it")
    t.add_argument("--config", required=True, help="configs/tokenizers/<name>.yaml")
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument("--out", default=None, help="override train.out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    e = tsub.add_parser("eval", help="metrics on held-out samples against baselines at the same bit budget")
    e.add_argument("--config", action="append", default=None,
                   help="a config (repeatable; default: every configs/tokenizers/*.yaml that has been trained)")
    e.add_argument("--out", default=None, help="override train.out (with a single --config)")
    e.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    e.add_argument("--max-samples", type=int, default=64, help="held-out samples per tokenizer (default 64)")
    e.add_argument("--rd", action="store_true",
                   help="also a rate-distortion curve (several bit budgets) for the tokenizers that allow one "
                        "(image_tokenbridge, image_1d, audio_codec) against their baselines (mmfm/tokenizers/rd.py)")
    e.add_argument("--plot-dir", default=None, help="with --rd: write rd_image.png / rd_audio.png here")
    e.add_argument("--perturb", default="0.05,0.1,0.2", metavar="FRACTIONS",
                   help="image tokenizers: also PSNR with these shares of the tokens replaced (psnr_p5, ...; "
                        "RobustTok's perturbed reconstruction, mmfm/tokenizers/robust.py); '' = off")
    e.add_argument("--perturb-neighbours", type=int, default=0, metavar="K",
                   help="with --perturb: a replaced token becomes one of its K nearest codes (0 = any other code)")
    pr = tsub.add_parser("prior", help="TokenBridge: a small AR prior over the saved tokenizer's tokens with "
                                        "independent channels, the per-dimension AR head, or flattened channels")
    pr.add_argument("--config", required=True, help="an image_tokenbridge config (its train.out holds the tokenizer)")
    pr.add_argument("--out", default=None, help="override train.out")
    pr.add_argument("--steps", type=int, default=400)
    pr.add_argument("--heads", default="independent,dimwise_ar,flattened")
    pr.add_argument("--max-train", type=int, default=2048, help="training images whose tokens fit the priors")
    pr.add_argument("--seeds", default="0", help="comma-separated seeds (one prior per head per seed)")
    pr.add_argument("--json", metavar="PATH")
    from mmfm.tokenizers.length_head import add_length_parsers

    add_length_parsers(tsub)
    i = tsub.add_parser("import-hf", help="an existing LLM's tokenizer (tokenizer.json or tokenizer.model) as the "
                                          "text tokenizer, for train.init_from=HF_FOLDER (docs/huggingface.md)")
    i.add_argument("folder", help="a Hugging Face model folder")
    i.add_argument("--out", required=True, help="the text tokenizer folder to write (e.g. tokenizers/text)")


def run_tokenizer(args) -> int:
    from mmfm.tokenizers.config import ConfigError

    try:
        if args.tokenizer_command == "import-hf":
            try:
                return import_main(args)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if args.tokenizer_command == "prior":
            return prior_main(args)
        if args.tokenizer_command in ("length-head", "adaptive"):
            from mmfm.tokenizers import length_head

            return (length_head.length_head_main if args.tokenizer_command == "length-head"
                    else length_head.adaptive_main)(args)
        return train_main(args) if args.tokenizer_command == "train" else eval_main(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"mmfm tokenizer {args.tokenizer_command}: {exc}", file=sys.stderr)
        return 2


def _config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def import_main(args) -> int:
    from mmfm.tokenizers.hf_text import import_text_tokenizer

    tok = import_text_tokenizer(args.folder, args.out)
    print(f"mmfm tokenizer import-hf: {args.out} ({tok.registry_name}, {tok.vocab_size} tokens at the checkpoint's "
          "ids); build vocab.json with it as the text tokenizer")
    return 0


# ------------------------------------------------------------------------------------ train
def train_main(args) -> int:
    from mmfm.tokenizers.config import load_config

    cfg = load_config(args.config)
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.out:
        cfg.train.out = args.out
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    os.makedirs(cfg.train.out, exist_ok=True)
    if is_text_tokenizer(cfg.tokenizer):
        return _train_text(cfg)
    return _train_neural(cfg, progress=not args.quiet)


def is_text_tokenizer(name: str) -> bool:
    """A tokenizer trained from strings with fit(texts) (sentencepiece `text`, `text_superbpe`)."""
    from mmfm.tokenizers.registry import tokenizer_class

    cls = tokenizer_class(name)
    return getattr(cls, "modality", "") == "text" and hasattr(cls, "fit")


def _train_text(cfg) -> int:
    from mmfm.tokenizers.data import read_samples
    from mmfm.tokenizers.registry import build_tokenizer

    d = cfg.data
    train = [s["txt"] for s in read_samples(d.shards, d.modality, "train", d.holdout_fraction, d.max_samples)
             if isinstance(s.get("txt"), str)]
    held = [s["txt"] for s in read_samples(d.shards, d.modality, "eval", d.holdout_fraction)
            if isinstance(s.get("txt"), str)]
    tok = build_tokenizer(cfg.tokenizer, cfg.model).fit(train)
    out = os.path.join(cfg.train.out, "tokenizer")
    tok.save(out)
    row = {"step": 0, "train_documents": len(train), "vocab_size": tok.vocab_size,
           "bytes_per_token_train": tok.bytes_per_token(train),
           "bytes_per_token_heldout": tok.bytes_per_token(held) if held else None}
    with open(os.path.join(cfg.train.out, "train.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"text tokenizer: {len(train)} documents, vocab {tok.vocab_size}, bytes/token held-out "
          f"{row['bytes_per_token_heldout']}; saved to {out}")
    return 0


def _train_neural(cfg, progress: bool, hooks=None) -> int:
    """hooks: fault injection for tests (mmfm/train/trainer.py: Hooks), passed to both stages."""
    import torch

    from mmfm.tokenizers.config import ConfigError
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.registry import build_tokenizer
    from mmfm.tokenizers.render import save_pairs
    from mmfm.tokenizers.train import train_stage
    from mmfm.train.engine import init_distributed
    from mmfm.train.metrics import JsonlLogger

    d, t, out = cfg.data, cfg.train, cfg.train.out
    torch.manual_seed(t.seed)
    tok = build_tokenizer(cfg.tokenizer, cfg.model)
    samples = read_samples(d.shards, d.modality, "train", d.holdout_fraction, d.max_samples)
    x = prepare_all(tok, [s for s in samples if _usable(tok, s)])
    print(f"{cfg.tokenizer}: {x.shape[0]} training samples {tuple(x.shape[1:])}, {tok.tokens_per_sample} tokens "
          f"of {tok.vocab_size} per sample", file=sys.stderr)
    try:
        if t.init:   # fine-tuning: the saved tokenizer's weights (and fitted statistics) are the start
            tok.load_init(t.init, where=f"{cfg.path}: train.init")
        if t.freeze:
            tok.freeze(t.freeze, where=f"{cfg.path}: train.freeze")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not t.init:
        tok.fit_data(x)
    if t.freeze:
        print(f"{cfg.tokenizer}: training with {', '.join(t.freeze)} frozen "
              f"({sum(p.numel() for p in tok.parameters() if p.requires_grad)} parameters trained)", file=sys.stderr)
    init_distributed()
    rank0 = _rank() == 0
    log = JsonlLogger(os.path.join(out, "train.jsonl"), os.path.join(out, "tb")) if rank0 else None
    res = train_stage(tok, cfg, x, steps=t.steps, seed=t.seed, checkpoint_dir=os.path.join(out, "checkpoints"),
                      logger=log, progress=progress, hooks=hooks)
    if hasattr(tok, "refinement_parameters"):  # physics: stage 2, the refinement alone on the frozen rest
        refine = {id(p) for p in tok.refinement_parameters()}
        trainable = [(p, p.requires_grad) for p in tok.parameters()]
        for p in tok.parameters():
            p.requires_grad_(id(p) in refine)
        train_stage(tok, cfg, x, steps=cfg.model.refine_steps, seed=t.seed + 1,
                    checkpoint_dir=os.path.join(out, "checkpoints_refine"),
                    logger=(lambda s, m: log(t.steps + s, {f"refine/{k}": v for k, v in m.items()})) if log else None,
                    progress=progress, hooks=hooks)
        for p, flag in trainable:
            p.requires_grad_(flag)
    if not rank0:
        return 0
    tok.after_training(x)
    tok.eval()
    held = [s for s in read_samples(d.shards, d.modality, "eval", d.holdout_fraction, 8) if _usable(tok, s)]
    if held:
        hx = prepare_all(tok, held)
        with torch.no_grad():
            recon = tok.decode(tok.encode_batch(hx))
            metrics = {k: v for k, v in tok.metrics(hx, recon).items() if isinstance(v, (int, float))}
        save_pairs(os.path.join(out, "reconstructions.png"), tok.preview(hx, recon))
        log(res.step, {f"heldout/{k}": v for k, v in metrics.items()})
        print("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if hasattr(tok, "psnr_by_prefix"):
            _prefix_plot(tok, hx, out)
    log.close()
    tok.save(os.path.join(out, "tokenizer"))
    print(f"saved {cfg.tokenizer} to {os.path.join(out, 'tokenizer')}")
    return 0


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _usable(tok, sample) -> bool:
    """Physics configs take 2D fields with the configured channels (any grid: prepare resamples it);
    other data in the shards is skipped."""
    if tok.modality != "physics":
        return True
    f = (sample.get("npz") or {}).get("fields")
    c = tok.config
    return f is not None and f.ndim == 4 and f.shape[1] == c.channels


def prefix_lengths(k: int) -> list[int]:
    out, n = [], 1
    while n < k:
        out.append(n)
        n *= 2
    return out + [k]


def _prefix_plot(tok, hx, out) -> list[float]:
    from mmfm.tokenizers.render import line_plot

    lengths = prefix_lengths(tok.tokens_per_sample)
    values = tok.psnr_by_prefix(hx, lengths)
    line_plot(os.path.join(out, "psnr_vs_tokens.png"), lengths, values, "held-out PSNR vs kept tokens",
              "tokens kept", "PSNR dB")
    write_json(os.path.join(out, "psnr_vs_tokens.json"), {"tokens": lengths, "psnr": values}, indent=None)
    return values


# ------------------------------------------------------------------------------------ prior
def prior_main(args) -> int:
    """Held-out NLL (bits per image) of TokenBridge tokens under each head (tokenbridge_prior.py)."""
    import dataclasses

    import torch

    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.config import ConfigError, load_config
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.tokenbridge_prior import HEADS, train_prior

    cfg = load_config(args.config)
    tok = load_tokenizer(os.path.join(args.out or cfg.train.out, "tokenizer"))
    if tok.registry_name != "image_tokenbridge":
        raise ConfigError(f"{args.config}: mmfm tokenizer prior needs an image_tokenbridge tokenizer, got "
                          f"{tok.registry_name!r}")
    heads = [h for h in args.heads.split(",") if h]
    bad = [h for h in heads if h not in HEADS]
    if bad:
        raise ConfigError(f"--heads: unknown head {bad[0]!r}; expected some of {', '.join(HEADS)}")
    d = cfg.data
    with torch.no_grad():
        tokens = {split: torch.cat([tok.encode_tensor(b) for b in prepare_all(
            tok, read_samples(d.shards, d.modality, split, d.holdout_fraction, args.max_train if split == "train"
                              else 0)).split(64)]) for split in ("train", "eval")}
    c = tok.config
    records = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for h in heads:
            r = train_prior(h, tokens["train"], tokens["eval"], c.latent_dim, c.num_bins, steps=args.steps, seed=seed)
            records.append({"bench": "tokenizer_prior", "case": {"tokenizer": _config_name(args.config),
                                                                 "tokens": tok.tokens_per_sample, "seed": seed},
                            "impl": h, **dataclasses.asdict(r), "code_bits": tok.bits_per_sample,
                            "heldout_images": tokens["eval"].shape[0], "train_images": tokens["train"].shape[0],
                            "steps": args.steps})
            print(records[-1], file=sys.stderr, flush=True)
    print_records(records, key=lambda r: str(r["case"]["seed"]))
    write_records(records, args.json)
    return 0


# ------------------------------------------------------------------------------------- eval
def _default_configs() -> list[str]:
    from mmfm.tokenizers.config import load_config

    found = []
    for p in sorted(glob.glob(packaged_config("tokenizers/*.yaml"))):
        if os.path.exists(os.path.join(load_config(p).train.out, "tokenizer")):
            found.append(p)
    return found


def parse_fractions(text: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1] for --perturb; an error naming the argument otherwise."""
    from mmfm.tokenizers.config import ConfigError

    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--perturb: expected comma-separated fractions in (0, 1], got {text!r}") from None
    bad = [f for f in out if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"--perturb: every fraction must be in (0, 1], got {bad[0]}")
    return out


def eval_records(cfg, name: str, tok, max_samples: int, perturb=(), perturb_neighbours: int = 0) -> list[dict]:
    """perturb: for an image tokenizer, fractions of tokens replaced; each adds psnr_p<percent> (the
    perturbed reconstruction, mmfm/tokenizers/robust.py) to the mmfm record, beside its clean psnr."""
    import torch

    from mmfm.tokenizers import baselines as B
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.metrics import chamfer, f_score, mel_distance, psnr, rel_l2, snr_db, ssim

    d = cfg.data
    held = read_samples(d.shards, d.modality, "eval", d.holdout_fraction, 0 if tok.modality == "text" else 0)
    if tok.modality == "text":
        texts = [s["txt"] for s in held if isinstance(s.get("txt"), str)]
        bpt = tok.bytes_per_token(texts)
        n_bytes = sum(len(s.encode()) for s in texts)
        case = {"tokenizer": name, "tokens": "variable"}
        recs = [{"bench": "tokenizer", "case": case, "impl": "mmfm", "bytes_per_token": bpt, "samples": len(texts),
                 "vocab_size": tok.vocab_size, "tokens_total": round(n_bytes / bpt)},
                {"bench": "tokenizer", "case": case, "impl": "utf8_bytes", "bytes_per_token": 1.0,
                 "samples": len(texts), "vocab_size": 256, "tokens_total": n_bytes}]
        if tok.registry_name == "text_superbpe":   # the claim's baseline: plain BPE, same vocabulary and data
            recs.append(_bpe_baseline(cfg, tok, texts, case, n_bytes))
        return recs
    held = [s for s in held if _usable(tok, s)][:max_samples]
    x = prepare_all(tok, held)
    with torch.no_grad():
        recon = torch.cat([tok.decode(tok.encode_batch(b)) for b in x.split(16)])
        m = tok.metrics(x, recon)
    bits = tok.bits_per_sample
    case = {"tokenizer": name, "tokens": tok.tokens_per_sample}
    common = {"samples": x.shape[0], "bits": round(bits, 1)}
    recs = [{"bench": "tokenizer", "case": case, "impl": "mmfm", **m, **common}]
    if perturb and tok.modality == "image":
        from mmfm.tokenizers.robust import perturbed_psnr

        recs[0].update(perturbed_psnr(tok, x, list(perturb), neighbours=perturb_neighbours))
        recs[0]["perturb_neighbours"] = perturb_neighbours
    if tok.registry_name == "image_tokenbridge":   # the float autoencoder, before post-training quantization
        with torch.no_grad():
            r = torch.cat([tok.continuous_reconstruction(b) for b in x.split(16)])
        recs.append({"bench": "tokenizer", "case": case, "impl": "continuous_autoencoder", "psnr": psnr(x, r),
                     "ssim": ssim(x, r), "samples": x.shape[0], "bits": None,
                     "latent_floats": tok.tokens_per_sample})
    if tok.modality == "image":
        from mmfm.tokenizers.rd import image_baselines

        recs += [{"bench": "tokenizer", "case": case, **r, "samples": x.shape[0]} for r in image_baselines(x, bits)]
    elif tok.modality == "video":
        r, s = B.video_bicubic(x, bits)
        recs.append({"bench": "tokenizer", "case": case, "impl": "bicubic", "psnr": psnr(x.flatten(0, 1), r.flatten(0, 1)),
                     "side": s, "samples": x.shape[0], "bits": 8 * x.shape[1] * x.shape[2] * s * s})
    elif tok.modality == "audio":
        bps = tok.bits_per_second()
        r, rate = B.mu_law_resample(x, tok.config.sample_rate, bps)
        recs.append({"bench": "tokenizer", "case": case, "impl": "mulaw_resample", "snr_db": snr_db(x, r),
                     "mel_distance": float(mel_distance(x, r, tok.config.sample_rate)), "bits_per_s": 8 * rate,
                     "rate_hz": rate, "samples": x.shape[0],
                     "bits": round(8 * rate * tok.config.clip_samples / tok.config.sample_rate, 1)})
    elif tok.modality == "physics":
        r, s = B.field_subsample(x, bits)
        recs.append({"bench": "tokenizer", "case": case, "impl": "subsample_bicubic", "rel_l2": rel_l2(x, r),
                     "side": s, "samples": x.shape[0], "bits": 16 * x.shape[1] * x.shape[2] * s * s})
    elif tok.modality == "shape3d":
        r, k = B.random_points(x, bits)
        recs.append({"bench": "tokenizer", "case": case, "impl": "random_subsample",
                     "chamfer": float(chamfer(r, x[..., :3]).mean()),
                     "f_score": f_score(r, x[..., :3], tok.config.fscore_threshold), "points": k,
                     "bytes_per_shape": bits / 8, "samples": x.shape[0], "bits": 48 * k})
    return recs


def _bpe_baseline(cfg, tok, texts, case, n_bytes) -> dict:
    import dataclasses

    from mmfm.tokenizers.data import read_samples
    from mmfm.tokenizers.superbpe import SuperBPETokenizer

    d = cfg.data
    train = [s["txt"] for s in read_samples(d.shards, d.modality, "train", d.holdout_fraction, d.max_samples)
             if isinstance(s.get("txt"), str)]
    bpe = SuperBPETokenizer(dataclasses.replace(cfg.model, transition_vocab_size=cfg.model.vocab_size)).fit(train)
    bpt = bpe.bytes_per_token(texts)
    return {"bench": "tokenizer", "case": case, "impl": "bpe_same_vocab", "bytes_per_token": bpt,
            "samples": len(texts), "vocab_size": bpe.vocab_size, "tokens_total": round(n_bytes / bpt)}


def rd_records_of(cfg, name: str, tok, max_samples: int) -> list[dict]:
    """rd.rd_records on the config's held-out split (and, for TokenBridge's bins, its training split)."""
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.rd import rd_records

    if tok.registry_name not in ("image_tokenbridge", "image_1d", "audio_codec"):
        return []
    d = cfg.data
    x = prepare_all(tok, read_samples(d.shards, d.modality, "eval", d.holdout_fraction)[:max_samples])
    train = None
    if tok.registry_name == "image_tokenbridge":
        train = prepare_all(tok, read_samples(d.shards, d.modality, "train", d.holdout_fraction, 2048))
    recs = rd_records(name, tok, x, train)
    for r in recs:
        r["case"]["modality"] = tok.modality
        r["samples"] = x.shape[0]
    return recs


NOT_BASELINES = ("mmfm", "continuous_autoencoder")   # records beside mmfm that are not rivals at its bits


def beats_baseline(records: list[dict], modality: str) -> dict[str, bool]:
    """{baseline impl: whether mmfm's primary figure beats it}, for the baselines that spent no more bits
    than mmfm (a codec over budget, e.g. a whole JPEG file of a 32x32 image, is no verdict)."""
    metric, higher = PRIMARY[modality]
    mine = [r for r in records if r["impl"] == "mmfm"]
    if not mine or mine[0].get(metric) is None:
        return {}
    m, budget = mine[0][metric], mine[0].get("bits")
    out = {}
    for r in records:
        if r["impl"] in NOT_BASELINES or r.get(metric) is None:
            continue
        if budget is not None and r.get("bits") is not None and r["bits"] > budget * 1.0001:
            continue
        if r.get("over_budget"):
            continue
        out[r["impl"]] = m > r[metric] if higher else m < r[metric]
    return out


def eval_main(args) -> int:
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.config import ConfigError, load_config

    perturb = parse_fractions(getattr(args, "perturb", "") or "")
    if getattr(args, "perturb_neighbours", 0) < 0:
        raise ConfigError(f"--perturb-neighbours: must be >= 0 (0 = any other code), got {args.perturb_neighbours}")
    paths = args.config or _default_configs()
    if not paths:
        print("mmfm tokenizer eval: no trained tokenizer found (train one with mmfm tokenizer train --config ...)",
              file=sys.stderr)
        return 2
    records, verdicts, rd = [], [], []
    for p in paths:
        cfg = load_config(p)
        out = args.out if args.out and len(paths) == 1 else cfg.train.out
        tok = load_tokenizer(os.path.join(out, "tokenizer"))
        recs = eval_records(cfg, _config_name(p), tok, args.max_samples, perturb,
                            getattr(args, "perturb_neighbours", 0))
        records += recs
        verdicts.append((_config_name(p), tok.modality, beats_baseline(recs, tok.modality)))
        if getattr(args, "rd", False):
            rd += rd_records_of(cfg, _config_name(p), tok, args.max_samples)
    print_records(records)
    if rd:
        print("\nrate-distortion (bits = bits per sample each impl spent; budget_bits in the case):")
        print_records(rd, key=lambda r: f"{r['case']['tokenizer']} {r['case']['rate']}")
        if args.plot_dir:
            from mmfm.tokenizers.rd import rd_plot

            os.makedirs(args.plot_dir, exist_ok=True)
            for modality, metric in (("image", "psnr"), ("audio", "snr_db")):
                part = [r for r in rd if r["case"]["modality"] == modality]
                if part:
                    path = os.path.join(args.plot_dir, f"rd_{modality}.png")
                    rd_plot(path, part, metric, f"held-out {metric} vs bits per {modality} sample")
                    print(f"wrote {path}")
        records += rd
    for name, modality, verdict in verdicts:
        metric = PRIMARY[modality][0]
        won = [k for k, v in verdict.items() if v]
        lost = [k for k, v in verdict.items() if not v]
        print(f"{name} on {metric}: beats the baselines [{', '.join(won)}]"
              + (f"; does NOT beat [{', '.join(lost)}]" if lost else ""))
    write_records(records, args.json)
    return 0


def print_records(records: list[dict], out=None, key=None) -> None:
    """One small table per tokenizer (or per `key(record)`; its records share the figures), blank line between."""
    out = out or sys.stdout  # looked up at call time (pytest's capsys swaps sys.stdout)
    key = key or (lambda r: str(r["case"]["tokenizer"]))
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    for i, recs in enumerate(groups.values()):
        figures = []
        for r in recs:
            for k, v in r.items():
                if k not in ("bench", "case", "impl") and isinstance(v, (int, float)) and k not in figures:
                    figures.append(k)
        rows = [["tokenizer", "tokens", "impl", *figures]]
        for r in recs:
            c = r["case"]
            cells = [str(c["tokenizer"]), str(c.get("tokens", c.get("rate", "-"))), r["impl"]]
            for f in figures:
                v = r.get(f)
                cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
            rows.append(cells)
        widths = [max(len(c) for c in col) for col in zip(*rows)]
        if i:
            print(file=out)
        for cells in rows:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out)
