"""`mmfm tokenizer train` and `mmfm tokenizer eval` end to end on a few synthetic image shards."""
import json
import os

from mmfm.cli import main
from mmfm.data.synthetic import synthetic_sample
from mmfm.data.writer import SampleShardWriter


def test_train_then_eval_writes_outputs_and_records(tmp_path, capsys):
    shards = tmp_path / "shards"
    with SampleShardWriter(str(shards), prefix="image", shard_size=20) as w:
        for i in range(60):
            w.write(synthetic_sample("image", i, 16))
    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
tokenizer: image_conv
model: {{image_size: 16, channels: 8, downsamples: 1, quantizer: fsq, latent_dim: 3, fsq_levels: [5, 5, 5]}}
data: {{shards: "{shards}", modality: image, holdout_fraction: 0.2}}
train: {{out: "{out}", steps: 4, batch_size: 8, log_every: 2, checkpoint_every: 2}}
""")
    assert main(["tokenizer", "train", "--config", str(cfg), "--quiet"]) == 0
    for f in ("tokenizer/tokenizer.yaml", "tokenizer/weights.safetensors", "train.jsonl", "reconstructions.png",
              "checkpoints/checkpoint.pt"):
        assert (out / f).exists(), f
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 2 and "loss" in rows[0] and any("heldout/psnr" in r for r in rows)
    assert os.listdir(out / "tb")
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["tokenizer", "eval", "--config", str(cfg), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "bicubic" in printed and "baseline" in printed
    records = json.loads(js.read_text())
    assert {r["impl"] for r in records} == {"mmfm", "bicubic"}
    for r in records:
        assert r["bench"] == "tokenizer" and set(r["case"]) == {"tokenizer", "tokens"}
        assert r["case"] == {"tokenizer": "tiny", "tokens": 64} and "psnr" in r


def test_bad_config_is_reported_with_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tokenizer: image_conv\nmodel: {imagesize: 3}\n")
    assert main(["tokenizer", "train", "--config", str(cfg)]) == 2
    assert "bad.yaml: model.imagesize: unknown field" in capsys.readouterr().err
