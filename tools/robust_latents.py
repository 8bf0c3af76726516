"""Perturbed reconstruction of image tokenizers side by side (RobustTok's pFID, here PSNR and the eval's
digit-scorer accuracy; mmfm/tokenizers/robust.py), for docs/benchmarks.md "Robust latents".

    python tools/robust_latents.py --corpus runs/demo/corpus --tokenizer base=DIR --tokenizer robust=DIR \
        [--fractions 0.05,0.1,0.2] [--neighbours K] [--n 200] [--cache-dir DIR] [--json PATH]

For each tokenizer and each share f of tokens replaced (0 = clean; the same positions and draws for
every tokenizer): PSNR over the corpus' held-out images (at most --n), and the accuracy of the eval's
digit scorer (mmfm eval prompts' own, fitted on that tokenizer's round trips of the training digits)
on the held-out digits decoded from perturbed tokens: how much a wrong token costs what the prompt
eval measures.

With --model NAME=EXPORT (repeatable) it measures the claim itself, on a model's own sampling errors:
each model generates images for the held-out digit and scene prompts (--seeds, one image per prompt
each, the eval's sampler settings), and every tokenizer decodes the *same* generated token sequences,
scored by its own fitted scorers. This needs tokenizers that share the model's token space (a decoder
fine-tuned with `train.freeze: [encoder, quantizer]`, configs/tokenizers/image_conv_vq_robust_decoder.yaml);
the tool checks that every tokenizer's encoder gives the export's tokens and refuses otherwise. The
differences are paired per generated image (the first --tokenizer is the reference).

    python tools/robust_latents.py --corpus runs/demo/corpus --model ar=runs/demo/export \
        --tokenizer base=runs/demo/export/tokenizers/image --tokenizer robust=runs/robust_dec/tokenizer \
        --seeds 0 1 2 --n 100 --json gen.json
"""
from __future__ import annotations

import argparse
import sys

from mmfm.jsonio import write_records


def main(argv=None) -> int:
    import torch

    from mmfm.eval import cache
    from mmfm.eval.promptsets import Corpus, build_set
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.metrics import psnr
    from mmfm.tokenizers.robust import fraction_label, perturbed_reconstructions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--fractions", default="0.05,0.1,0.2")
    ap.add_argument("--neighbours", type=int, default=0)
    ap.add_argument("--n", type=int, default=200, help="held-out images for PSNR, and held-out digits")
    ap.add_argument("--cache-dir", default=None, help="fitted scorers (default <corpus>/.scorers)")
    ap.add_argument("--json")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=EXPORT",
                    help="generate with this export and decode its tokens with every --tokenizer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--model: sampler seeds")
    ap.add_argument("--temperature", type=float, default=0.9, help="--model: sampling temperature")
    ap.add_argument("--top-k", type=int, default=100, help="--model: top-k (0 = off)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    named = []
    for flag, specs in (("--tokenizer", a.tokenizer), ("--model", a.model)):
        for spec in specs:
            if "=" not in spec:
                print(f"{flag}: expected NAME=DIR, got {spec!r}", file=sys.stderr)
                return 2
            named.append((flag, *spec.split("=", 1)))
    if a.model:
        try:
            return generated(a, [(n, d) for f, n, d in named if f == "--tokenizer"],
                             [(n, d) for f, n, d in named if f == "--model"])
        except (ValueError, FileNotFoundError) as exc:
            print(f"robust_latents: {exc}", file=sys.stderr)
            return 2
    fractions = [0.0] + [float(f) for f in a.fractions.split(",") if f]
    corpus = Corpus(a.corpus)
    held = read_samples(f"{a.corpus}/image-*.tar", "image", "eval", 0.1)[:a.n]
    records = []
    for spec in a.tokenizer:
        name, folder = spec.split("=", 1)
        tok = load_tokenizer(folder).eval()
        x = prepare_all(tok, held)
        ps = build_set(corpus, "digits", a.n)
        scorer = cache.scorer("digits", ps.train, corpus.folder, a.cache_dir, tok)
        digits = torch.stack([tok.prepare(it.sample) for it in ps.items])
        want = [it.labels["digit"] for it in ps.items]
        recon = perturbed_reconstructions(tok, x, fractions, neighbours=a.neighbours)
        drecon = perturbed_reconstructions(tok, digits, fractions, neighbours=a.neighbours)
        for f in fractions:
            pred = scorer.predict(list(drecon[f]))["digit"]
            records.append({"bench": "robust_latents", "case": {"tokenizer": name, "replaced": fraction_label(f)},
                            "impl": "mmfm", "psnr": psnr(x, recon[f]),
                            "digit_accuracy": sum(p == w for p, w in zip(pred, want)) / len(want),
                            "images": x.shape[0], "digits": len(want), "neighbours": a.neighbours})
    print("tokenizer  replaced  psnr    digit_accuracy")
    for r in records:
        print(f"{r['case']['tokenizer']:<10} {r['case']['replaced']:<9} {r['psnr']:<7.2f} {r['digit_accuracy']:.3f}")
    write_records(records, a.json)
    return 0


def _paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean of the paired differences values - reference, and its standard error."""
    import math

    d = [x - y for x, y in zip(values, reference)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1) / len(d))


def generated(a, tokenizers: list[tuple[str, str]], models: list[tuple[str, str]]) -> int:
    """The --model mode: every model's generated image tokens, decoded by every tokenizer. Each
    tokenizer gets the prompt eval's own PromptEval (its prompt sets, fitted scorers and round-trip
    ceiling), so the scores are what `mmfm eval prompts` would report for that decoder."""
    import math

    import torch

    from mmfm.eval.gen import Sampling, generate_tokens, load_export
    from mmfm.eval.runner import PromptEval, task_name
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.tokenizers.data import prepare_all, read_samples
    from mmfm.tokenizers.metrics import PCAFeatures, frechet_distance

    loaded = [(name, load_tokenizer(folder).eval()) for name, folder in tokenizers]
    held = read_samples(f"{a.corpus}/image-*.tar", "image", "eval", 0.1)[:a.n]
    train = read_samples(f"{a.corpus}/image-*.tar", "image", "train", 0.1)[:4000]
    rows, ref = [], loaded[0][0]
    for mname, export in models:
        model, vocab, toks = load_export(export)
        own = toks["image"]
        x = prepare_all(own, held)
        want_tokens = own.encode_batch(x)
        for name, tok in loaded:       # the same token space, or the comparison means nothing
            agree = float((tok.encode_batch(x) == want_tokens).float().mean())
            if agree < 1.0:
                raise ValueError(f"--tokenizer {name}: its encoder gives the tokens of --model {mname}'s image "
                                 f"tokenizer at only {agree:.1%} of the positions of {len(held)} held-out images; "
                                 "generated tokens mean what that tokenizer made them (fine-tune the decoder with "
                                 "train.freeze: [encoder, quantizer])")
        evals = {name: PromptEval(a.corpus, vocab, {"image": tok, "text": toks["text"]}, n=a.n,
                                  modalities=["image"], cache_dir=a.cache_dir) for name, tok in loaded}
        first = evals[ref]
        sets = list(first.sets.values())           # the same prompts for every tokenizer (same corpus, n)
        prompts = [p for ps in sets for p in first.prompts[ps.name]]
        # Fréchet distance to the prompts' own (held-out) images in a PCA space of real training images:
        # an FID stand-in that sees artefacts the scorers' labels ignore; one figure per seed
        real = torch.stack([own.prepare(it.sample) for ps in sets for it in ps.items])
        pca = PCAFeatures(prepare_all(own, train))
        real_f = pca(real)
        fd = {name: [] for name, _ in loaded}
        fd_rt = {name: frechet_distance(real_f, pca(tok.decode(tok.encode_batch(real)))) for name, tok in loaded}
        correct: dict = {}      # (tokenizer, set, task) -> list of 0/1 over seeds x items
        for seed in a.seeds:
            s = Sampling(temperature=a.temperature, top_k=a.top_k, seed=seed, batch_size=100)
            local = generate_tokens(model, vocab, prompts, "image", own.tokens_per_sample, s)
            for name, tok in loaded:
                images = torch.cat([tok.decode(local[i:i + 100]) for i in range(0, len(local), 100)])
                fd[name].append(frechet_distance(real_f, pca(images)))
                at = 0
                for ps in sets:
                    pred = evals[name].scorers[ps.name].predict(list(images[at:at + len(ps.items)]))
                    at += len(ps.items)
                    for t in ps.tasks:
                        correct.setdefault((name, ps.name, t), []).extend(
                            float(p == it.labels[t]) for p, it in zip(pred[t], ps.items))
        for name, _ in loaded:
            mean_d, se_d = _paired(fd[name], fd[ref])
            rows.append({"bench": "robust_latents_generated", "model": mname, "tokenizer": name,
                         "task": "frechet_pca32", "frechet": sum(fd[name]) / len(fd[name]),
                         "frechet_by_seed": fd[name], "frechet_round_trip": fd_rt[name], f"minus_{ref}": mean_d,
                         f"minus_{ref}_se": se_d, "images": len(real),
                         "temperature": a.temperature, "top_k": a.top_k, "seeds": a.seeds})
        for (name, sname, t), hits in correct.items():
            n = len(hits)
            acc = sum(hits) / n
            mean_d, se_d = _paired(hits, correct[ref, sname, t])
            ceiling = next(r["accuracy"] for r in evals[name].reference
                           if r["impl"] == "ceiling" and r["case"]["task"] == task_name(sname, t))
            rows.append({"bench": "robust_latents_generated", "model": mname, "tokenizer": name,
                         "task": f"{sname}/{t}", "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n),
                         "ceiling": ceiling, "images": n, f"minus_{ref}": mean_d, f"minus_{ref}_se": se_d,
                         "temperature": a.temperature, "top_k": a.top_k, "seeds": a.seeds})
    print(f"model      tokenizer  task            accuracy (se)    ceiling  minus {ref} (paired se)   "
          "[frechet rows: distance, round trip's distance]")
    for r in rows:
        if "frechet" in r:
            print(f"{r['model']:<10} {r['tokenizer']:<10} {r['task']:<15} {r['frechet']:<16.3f} "
                  f"{r['frechet_round_trip']:<8.3f} {r[f'minus_{ref}']:+.3f} ({r[f'minus_{ref}_se']:.3f})")
            continue
        print(f"{r['model']:<10} {r['tokenizer']:<10} {r['task']:<15} {r['accuracy']:.3f} ({r['se']:.3f})    "
              f"{r['ceiling']:.3f}    {r[f'minus_{ref}']:+.3f} ({r[f'minus_{ref}_se']:.3f})")
    write_records(rows, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
