"""`mmfm bench sparsity`: modality-aware sparsity (Mixture-of-Transformers) against the dense model
at matched training FLOPs, per modality.

The claim (Liang et al., Mixture-of-Transformers, the seeds): giving every modality its own copy of
the non-embedding weights, while each token still passes through exactly one copy, reaches the dense
model's loss with a fraction of its training FLOPs. Both models here do the same matmul FLOPs per
token (ModelConfig.flops_per_token counts the *active* weights: one modality copy), see the same
batches in the same order (same config, seed and data), in the same precision, with no offload; only
`model.modality_sparse` differs. So the x axis, training FLOPs = step x flops_per_token(seq_len) x
micro_batch x seq_len x grad_accum x ranks (pad positions of `pack: whole` rows counted alike on both
sides), is shared, and the curves compare loss per FLOP directly.

Two ways to run it:
  mmfm bench sparsity --tokens runs/demo/tokens --out runs/bench_sparsity [--steps 1350]
      trains both models with configs/pretrain/demo.yaml on the demo's tokens (two `mmfm pretrain`
      subprocesses, eval every --eval-every steps), then compares them;
  mmfm bench sparsity --runs dense=DIR sparse=DIR [--out DIR]
      compares two finished pretrain folders (config.json + metrics.jsonl).
Writes <out>/sparsity.png (held-out loss against training FLOPs, one panel per modality),
<out>/sparsity.json (records) and prints the table: each modality's final held-out loss on both sides
and the FLOP fraction at which the sparse model first reached the dense model's final loss
(linear interpolation between evals; '-' when it never did).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mmfm.jsonio import write_json

MODELS = {"dense": "models/small.yaml", "sparse": "models/small_mot.yaml"}


def read_run(folder: str) -> dict:
    """{'flops_per_step', 'evals': [(step, {modality: loss})], 'model'} of a pretrain folder."""
    from mmfm.models.config import model_config_from_dict

    cfg_path, metrics_path = os.path.join(folder, "config.json"), os.path.join(folder, "metrics.jsonl")
    for p in (cfg_path, metrics_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"--runs: {folder!r} has no {os.path.basename(p)}; expected a finished "
                                    "`mmfm pretrain` folder (train.out)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model = model_config_from_dict(cfg["model"], f"{cfg_path}: model")
    seq_len, train = cfg["data"]["seq_len"], cfg["train"]
    tokens_per_step = train["micro_batch"] * seq_len * train["grad_accum"] * int(cfg.get("world_size") or 1)
    evals = []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            losses = {k[len("eval_loss_"):]: v for k, v in row.items() if k.startswith("eval_loss_")}
            if losses:
                evals.append((int(row["step"]), {**losses, "all": row["eval_loss"]}))
    if len(evals) < 2:
        raise ValueError(f"--runs: {metrics_path} has {len(evals)} held-out evals; the curve needs at least 2 "
                         "(train.eval_every below train.steps)")
    return {"flops_per_step": model.flops_per_token(seq_len) * tokens_per_step, "evals": evals,
            "sparse": bool(model.modality_sparse), "params": model.active_params()}


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first x where the piecewise-linear curve [(x, loss)] reaches loss <= target; None if never."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 <= target:
            return x0
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def compare(dense: dict, sparse: dict) -> list[dict]:
    """One record per modality both runs evaluated (and 'all')."""
    if abs(dense["flops_per_step"] - sparse["flops_per_step"]) > 1e-6 * dense["flops_per_step"]:
        raise ValueError(f"the runs do not do the same FLOPs per step ({dense['flops_per_step']:.4g} against "
                         f"{sparse['flops_per_step']:.4g}): they are not FLOP-matched (same model size, seq_len, "
                         "micro_batch, grad_accum and ranks are required)")
    mods = [m for m in dense["evals"][-1][1] if m in sparse["evals"][-1][1] and m != "special"]
    records = []
    for m in mods:
        curve = {k: [(s * r["flops_per_step"], ev[m]) for s, ev in r["evals"] if m in ev]
                 for k, r in (("dense", dense), ("sparse", sparse))}
        d_final, s_final = curve["dense"][-1], curve["sparse"][-1]
        reach = flops_to_reach(curve["sparse"], d_final[1])
        records.append({"bench": "sparsity", "case": {"modality": m}, "impl": "mot_vs_dense",
                        "dense_loss": d_final[1], "sparse_loss": s_final[1], "train_flops": d_final[0],
                        "sparse_flops_to_dense_final": reach,
                        "flop_fraction": None if reach is None else reach / d_final[0]})
    return records


def plot(dense: dict, sparse: dict, records: list[dict], path: str) -> None:
    from PIL import Image

    from mmfm.train.metrics import loss_plot

    panels = []
    for rec in records:
        m = rec["case"]["modality"]
        # from the first eval after step 0: the untrained model's ~8.3 would flatten every difference
        series = {k: ([round(s * r["flops_per_step"] / 1e12, 2) for s, ev in r["evals"] if m in ev and s > 0],
                      [ev[m] for s, ev in r["evals"] if m in ev and s > 0])
                  for k, r in (("dense", dense), ("MoT", sparse))}
        tile = path + f".{m}.png"
        loss_plot(tile, series, f"{m}: held-out loss", size=(420, 260), xlabel="training TFLOPs")
        panels.append(Image.open(tile).copy())
        os.remove(tile)
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    sheet = Image.new("RGB", (420 * cols, 260 * rows), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * 420, (i // cols) * 260))
    sheet.save(path)


def train_pair(tokens: str, out: str, steps: int, eval_every: int, extra: list[str]) -> dict:
    from mmfm.typed_config import packaged_config

    runs = {}
    for name, model in MODELS.items():
        folder = os.path.join(out, name)
        runs[name] = folder
        if os.path.exists(os.path.join(folder, "summary.json")):
            print(f"[sparsity] {name}: reusing {folder}", file=sys.stderr)
            continue
        cmd = [sys.executable, "-m", "mmfm.cli", "pretrain", "--config", packaged_config("pretrain/demo.yaml"),
               f"model={packaged_config(model)}", f"data.shards={tokens}/train-*.tar",
               f"data.eval_shards={tokens}/eval-*.tar", f"data.vocab={tokens}/vocab.json", f"train.out={folder}",
               f"train.steps={steps}", f"train.eval_every={eval_every}", f"train.checkpoint_every={steps}",
               "train.progress=false", *extra]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": os.environ.get("MASTER_PORT", "29631"), "DS_ACCELERATOR": "cpu", **os.environ}
        print(f"[sparsity] training {name} ({model}, {steps} steps) -> {folder}", file=sys.stderr)
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise RuntimeError(f"mmfm bench sparsity: training {name} failed (status {rc}); its log is above")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mmfm bench sparsity", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", help="token shards folder (mmfm demo's <out>/tokens): train both models on it")
    ap.add_argument("--runs", nargs=2, metavar="NAME=DIR", help="dense=DIR sparse=DIR: compare two finished runs")
    ap.add_argument("--out", default="runs/bench_sparsity", help="folder for the runs, the plot and the records")
    ap.add_argument("--steps", type=int, default=1350)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--device", default="cpu", help="cpu only: the training runs use DeepSpeed's CPU accelerator")
    ap.add_argument("override", nargs="*", help="pretrain config overrides for both runs, e.g. train.micro_batch=4")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        ap.error(f"--device {args.device!r}: this benchmark trains with DeepSpeed's CPU accelerator; only cpu is "
                 "supported (on a GPU run `mmfm pretrain` with both model configs and use --runs)")
    if bool(args.tokens) == bool(args.runs):
        ap.error("give either --tokens DIR (train both models) or --runs dense=DIR sparse=DIR (compare)")
    os.makedirs(args.out, exist_ok=True)
    if args.tokens:
        runs = train_pair(args.tokens, args.out, args.steps, args.eval_every, args.override)
    else:
        runs = {}
        for item in args.runs:
            name, sep, folder = item.partition("=")
            if not sep or name not in MODELS:
                ap.error(f"--runs: {item!r}: expected dense=DIR and sparse=DIR")
            runs[name] = folder
        if set(runs) != set(MODELS):
            ap.error("--runs: need one dense=DIR and one sparse=DIR")
    dense, sparse = read_run(runs["dense"]), read_run(runs["sparse"])
    if dense["sparse"] or not sparse["sparse"]:
        raise SystemExit("mmfm bench sparsity: the dense run must have model.modality_sparse false and the sparse "
                         "run true (check --runs)")
    records = compare(dense, sparse)
    plot(dense, sparse, records, os.path.join(args.out, "sparsity.png"))
    write_json(os.path.join(args.out, "sparsity.json"), records)
    rows = [[r["case"]["modality"], f"{r['dense_loss']:.3f}", f"{r['sparse_loss']:.3f}",
             "-" if r["flop_fraction"] is None else f"{r['flop_fraction']:.2f}"] for r in records]
    print(f"MoT vs dense at {records[0]['train_flops'] / 1e12:.2f} training TFLOPs each "
          f"(same FLOPs per token; {sparse['params'] / 1e6:.2f} M active parameters per token on both sides)")
    head = ["modality", "dense held-out loss", "MoT held-out loss", "MoT FLOPs to dense's final loss"]
    for row in [head] + rows:
        print("  ".join(f"{c:>{len(h)}}" if i else f"{c:<9}" for i, (c, h) in enumerate(zip(row, head))))
    print(f"(plot {os.path.join(args.out, 'sparsity.png')}; records {os.path.join(args.out, 'sparsity.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
