"""`mmfm tokenizer train` (on the DeepSpeed engine) and `mmfm tokenizer eval` end to end on a few
synthetic image shards, and resume from the engine's checkpoints.

Training runs in one child process (it starts a one-rank gloo group, which must not live in the
pytest process): three runs there, a full one and one stopped then resumed, share the group."""
import json
import os
import subprocess
import sys

import torch

from mmfm.cli import main
from mmfm.data.synthetic import synthetic_sample
from mmfm.data.writer import SampleShardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)

# full: 6 steps; part: 3 steps (checkpoint at 3), then the same config to 6 steps resumes at 3
CHILD = """
import sys
from mmfm.cli import main
full, part = sys.argv[1], sys.argv[2]
assert main(["tokenizer", "train", "--config", full, "--quiet"]) == 0
assert main(["tokenizer", "train", "--config", part, "--quiet", "--steps", "3"]) == 0
assert main(["tokenizer", "train", "--config", part, "--quiet"]) == 0
"""


def _config(tmp_path, name, shards, body):
    out = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(body.format(shards=shards, out=out))
    return cfg, out


def test_train_resume_then_eval(tmp_path, capsys):
    from safetensors.torch import load_file

    shards = tmp_path / "shards"
    with SampleShardWriter(str(shards), prefix="image", shard_size=20) as w:
        for i in range(60):
            w.write(synthetic_sample("image", i, 16))
    # image_1d: its nested-dropout generator must come back on resume too
    body = """
tokenizer: image_1d
model: {{image_size: 16, patch_size: 4, width: 16, depth: 1, heads: 2, num_tokens: 4, latent_dim: 3, fsq_levels: [5, 5, 5]}}
data: {{shards: "{shards}", modality: image, holdout_fraction: 0.2}}
optim: {{lr: 0.003, warmup_steps: 2, min_lr_ratio: 0.1}}
train: {{out: "{out}", steps: 6, batch_size: 8, log_every: 2, checkpoint_every: 3, keep_last: 1}}
"""
    full_cfg, full = _config(tmp_path, "full", shards, body)
    part_cfg, part = _config(tmp_path, "part", shards, body)
    p = subprocess.run([sys.executable, "-c", CHILD, str(full_cfg), str(part_cfg)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 3" in p.stderr
    for f in ("tokenizer/tokenizer.yaml", "tokenizer/weights.safetensors", "train.jsonl", "reconstructions.png",
              "psnr_vs_tokens.png", "checkpoints/latest", "checkpoints/step_00000006/COMPLETE"):
        assert (full / f).exists(), f
    assert not (full / "checkpoints/step_00000003").exists()   # keep_last 1
    rows = [json.loads(line) for line in (full / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert rows[0]["lr"] > rows[2]["lr"] and any("heldout/psnr" in r for r in rows)   # cosine decays
    assert os.listdir(full / "tb")
    a = load_file(str(full / "tokenizer/weights.safetensors"))
    b = load_file(str(part / "tokenizer/weights.safetensors"))
    for k in a:   # an interrupted-and-resumed run ends where the uninterrupted one does
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    resumed_rows = [json.loads(line) for line in (part / "train.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed_rows if r["step"] == 6 and "loss" in r] == [rows[2]["loss"]]

    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["tokenizer", "eval", "--config", str(full_cfg), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "bicubic" in printed and "baseline" in printed
    records = json.loads(js.read_text())
    assert {r["impl"] for r in records} == {"mmfm", "bicubic", "jpeg", "jpeg_shared_tables", "webp"}
    budget = next(r["bits"] for r in records if r["impl"] == "mmfm")
    for r in records:
        assert r["bench"] == "tokenizer" and set(r["case"]) == {"tokenizer", "tokens"}
        assert r["case"] == {"tokenizer": "full", "tokens": 4} and "psnr" in r
        assert r["bits"] <= budget or r["over_budget"] > 0, r   # each impl's own bits, never hidden

    # rate-distortion: image_1d's prefixes 1, 2, 4 tokens, baselines at each budget, a plot
    assert main(["tokenizer", "eval", "--config", str(full_cfg), "--rd", "--plot-dir", str(tmp_path / "rd"),
                 "--json", str(js)]) == 0
    rd = [r for r in json.loads(js.read_text()) if r["bench"] == "tokenizer_rd"]
    mine = [r for r in rd if r["impl"] == "mmfm"]
    assert [r["case"]["rate"] for r in mine] == ["1 tokens", "2 tokens", "4 tokens"]
    assert [r["bits"] for r in mine] == sorted(r["bits"] for r in mine) and len({r["bits"] for r in mine}) == 3
    for r in rd:
        assert r["bits"] <= r["case"]["budget_bits"] + 1e-6 or r.get("over_budget", 0) > 0, r
    assert {r["impl"] for r in rd} == {"mmfm", "bicubic", "jpeg", "jpeg_shared_tables", "webp"}
    assert (tmp_path / "rd" / "rd_image.png").stat().st_size > 1000


def test_bad_config_is_reported_with_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tokenizer: image_conv\nmodel: {imagesize: 3}\n")
    assert main(["tokenizer", "train", "--config", str(cfg)]) == 2
    assert "bad.yaml: model.imagesize: unknown field" in capsys.readouterr().err


def test_engine_spec_is_the_shared_typed_sections(tmp_path):
    """A tokenizer file's optim/deepspeed sections are pretraining's types; its global batch is split
    over the ranks into the shared TrainSection the Trainer reads."""
    import pytest

    from mmfm.tokenizers.config import load_config
    from mmfm.tokenizers.train import engine_spec
    from mmfm.train.config import OptimSection, TrainSection
    from mmfm.typed_config import ConfigError

    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1}}')
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"tokenizer: image_conv\ndeepspeed: {ds}\noptim: {{lr: 0.01, clip: 0.5}}\n"
                   "train: {steps: 9, batch_size: 12, keep_last: 3}\n")
    spec = engine_spec(load_config(cfg), world=3, steps=7, progress=False)
    assert isinstance(spec.optim, OptimSection) and isinstance(spec.train, TrainSection)
    assert (spec.optim.lr, spec.optim.clip, spec.optim.beta2, spec.optim.min_lr_ratio) == (0.01, 0.5, 0.999, 1.0)
    assert (spec.train.micro_batch, spec.train.grad_accum, spec.train.steps, spec.train.keep_last) == (4, 1, 7, 3)
    assert spec.deepspeed == {"zero_optimization": {"stage": 1}} and spec.deepspeed_path == str(ds)
    with pytest.raises(ConfigError, match=r"t.yaml: train.batch_size: 12 is not divisible by the 5 ranks"):
        engine_spec(load_config(cfg), world=5, steps=7)
    cfg.write_text("tokenizer: image_conv\ndeepspeed: /nope.json\n")
    with pytest.raises(ConfigError, match=r"t.yaml: deepspeed: cannot read /nope.json"):
        load_config(cfg)
