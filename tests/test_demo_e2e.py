"""`mmfm demo e2e --preset test`: the make-demo pipeline at toy sizes (corpus -> six tokenizers ->
token shards -> ZeRO-2 pretrain -> export), run as a user would, in a subprocess."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_e2e_test_preset_loss_falls_and_export_loads(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "demo", "e2e", "--preset", "test", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "held-out loss per modality" in p.stdout and "export" in p.stdout
    s = json.loads((out / "demo-summary.json").read_text())
    assert s["zero_stage"] == 2 and s["steps"] == 30
    assert s["heldout_end"]["all"] < s["heldout_start"]["all"] - 0.5
    assert s["train_loss_last"] < s["train_loss_first"]
    # every modality reached the token shards, and the shards decode back through the vocabulary
    assert all(v["samples"] > 0 for v in s["token_report"]["modalities"].values()), s["token_report"]
    for m in ("text", "image", "audio", "video", "shape3d", "physics"):
        assert (out / "tokenizers" / m / "tokenizer" / "tokenizer.yaml").exists()
    from mmfm.vocab import Vocab

    vocab = Vocab.load(out / "tokens" / "vocab.json")
    import io
    import tarfile

    seen = set()
    for shard in sorted(glob.glob(str(out / "tokens" / "train-*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".npy"):
                    ids = np.load(io.BytesIO(tar.extractfile(member).read()))
                    seen.update(m for m, _ in vocab.decode_sample(ids))
    assert seen == {"text", "image", "audio", "video", "shape3d", "physics"}
    # the export loads back and runs; its tokenizers and vocabulary travel with it
    import mmfm

    model = mmfm.load(s["export"])
    with torch.no_grad():
        logits = model(torch.arange(16).reshape(1, 16))
    assert logits.shape == (1, 16, vocab.size) and bool(torch.isfinite(logits).all())
    assert os.path.exists(os.path.join(s["export"], "vocab.json"))
    assert os.path.exists(os.path.join(s["export"], "tokenizers", "image", "tokenizer.yaml"))
    # the Hugging Face side: the text tokenizer at its unified ids, the model card with the run's figures
    from transformers import AutoTokenizer

    from mmfm.tokenizers import load_tokenizer

    text_tok = load_tokenizer(os.path.join(s["export"], "tokenizers", "text"))
    hf_tok = AutoTokenizer.from_pretrained(s["export"])
    caption = "a red circle at the top left, 12 px"
    assert hf_tok.encode(caption, add_special_tokens=False) == text_tok.encode(caption).tolist()
    card = open(os.path.join(s["export"], "README.md")).read()
    last_eval = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl") if '"eval_loss"' in line][-1]
    assert f"| eval_loss | {last_eval['step']} | {last_eval['eval_loss']:.4f} |" in card
    # stage 6: one generated sample per modality, written and readable
    from mmfm.generate.outputs import read_output

    assert [r["modality"] for r in s["samples"]] == ["text", "image", "audio", "video", "shape3d", "physics"]
    for r in s["samples"]:
        assert all(os.path.getsize(p) > 0 for p in r["paths"]), r
        read_output(r["paths"][0], r["modality"])
    assert "samples" in p.stdout


def test_every_preset_builds_its_configs(tmp_path):
    """Each preset's corpus plan, six tokenizer configs (with its overrides: an unknown field is an
    error) and pretraining config load; the long preset carries the demo's tokenizer model settings
    (it fell behind them once: docs/benchmarks.md, "Quality against compute")."""
    import pytest

    from mmfm.data.demo_corpus import demo_plan
    from mmfm.demos.e2e import MODALITIES, PRESETS, tokenizer_config
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import packaged_config

    for name, preset in PRESETS.items():
        plan = demo_plan(preset["scale"], preset.get("corpus_counts"))
        assert all(v >= 0 for v in plan.values())
        for m in MODALITIES:
            cfg = tokenizer_config(m, str(tmp_path / "corpus"), str(tmp_path / name), preset)
            for k, v in preset["tokenizer_overrides"].get(m, {}).items():
                section, field = k.split(".", 1)
                assert getattr(getattr(cfg, section), field) == v, (name, m, k)
            if preset["tokenizer_steps"][m]:
                assert cfg.train.steps == preset["tokenizer_steps"][m]
        cfg = load_run_config(packaged_config(preset["pretrain_config"]), list(preset["pretrain_overrides"]))
        assert cfg.train.steps > 0
    demo, long = PRESETS["demo"]["tokenizer_overrides"], PRESETS["long"]["tokenizer_overrides"]
    for m, over in demo.items():
        for k, v in over.items():
            if k.startswith("model.") or k == "data.max_samples" and m == "text":
                assert long.get(m, {}).get(k) == v, f"long preset: {m} {k} differs from the demo's {v!r}"
    long_cfg = load_run_config(packaged_config(PRESETS["long"]["pretrain_config"]), [])
    assert long_cfg.data.caption_dropout > 0 and long_cfg.data.pack == "whole" and long_cfg.data.mix
    with pytest.raises(ValueError, match="no such field"):
        tokenizer_config("image", str(tmp_path), str(tmp_path), {**PRESETS["demo"], "tokenizer_overrides":
                                                                 {"image": {"model.colour": 3}}})
