"""mmfm finetune: LoRA merge equals the unmerged model; freezing; a LoRA fine-tune from an export
under ZeRO-2 with the loss on one modality, exported (merged) and checked against the unmerged run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmfm.models import Transformer
from mmfm.models.config import load_model_config
from mmfm.models.lora import apply_lora, merge_lora_state
from mmfm.train.finetune import FinetuneSection, apply_freeze, parse_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(vocab=200):
    cfg = load_model_config(f"{REPO}/configs/models/tiny.yaml")
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    return cfg, Transformer(cfg)


def test_lora_merge_equals_unmerged_outputs():
    cfg, model = _tiny()
    f = FinetuneSection(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets=["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(200, (2, 24))
    with torch.no_grad():
        base = model(ids)                    # the weights the update starts from
    apply_lora(model, f.lora_targets, f.lora_rank, f.scale, f.train_also)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0: LoRA starts as the identity
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)            # a trained-looking update (B starts at zero)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        unmerged = model(ids)
    plain = Transformer(cfg)
    plain.load_state_dict(merge_lora_state(model.state_dict(), f.scale))
    with torch.no_grad():
        merged = plain(ids)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (merged - base).abs().max() > 1e-3   # the merge carries the update, not the base weights alone


def test_freezing_and_bad_sections():
    _, model = _tiny()
    apply_freeze(model, FinetuneSection(method="full", freeze="modality_specific"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("embed_tokens", "lm_head"))}
    _, model = _tiny()
    apply_freeze(model, FinetuneSection(method="full", freeze="shared"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == frozen
    from mmfm.tokenizers.config import ConfigError

    with pytest.raises(ConfigError, match="ft.yaml: finetune.method"):
        parse_section({"method": "qlora"}, "ft.yaml")
    with pytest.raises(ConfigError, match="ft.yaml: finetune.lora_targets"):
        parse_section({"lora_targets": ["wq"]}, "ft.yaml")


def test_lora_finetune_from_export_loss_on_one_modality_and_merged_export(tmp_path):
    from mmfm.export import write_folder
    from mmfm.models.io import load
    from mmfm.train.checkpoint import consolidate
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(tmp_path / "vocab.json")
    synthetic_token_corpus(str(tmp_path / "shards"), v, n=120)
    cfg, model = _tiny(v.size)
    src = write_folder(model.state_dict(), cfg, str(tmp_path / "src"), str(tmp_path / "vocab.json"))
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"""deepspeed: {REPO}/configs/deepspeed/zero2.json
data: {{shards: "{tmp_path}/shards", vocab: "{tmp_path}/vocab.json", seq_len: 64}}
optim: {{lr: 1.0e-2, warmup_steps: 1, weight_decay: 0.0}}
train: {{out: "{tmp_path}/run", steps: 8, micro_batch: 4, checkpoint_every: 8, progress: false, plot: false, threads: 1}}
finetune: {{method: lora, lora_rank: 4, lora_alpha: 8.0, lora_targets: [q_proj, v_proj, up_proj]}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmfm.cli", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    p = run("finetune", "--from", src, "--modality", "image", "--config", str(ft))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    # the optimised loss is the image tokens' CE alone (other modalities are reported, weight 0)
    assert rows and all("loss_image" in r and abs(r["loss"] - r["loss_image"]) < 1e-5 for r in rows)
    assert any(abs(r.get("loss_text", r["loss"]) - r["loss"]) > 1e-3 for r in rows)
    p = run("export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert p.returncode == 0, p.stderr[-3000:]
    # the model card is written from the run's own records: its config and data; this run had no
    # held-out split, so the card has no evaluation section (test_demo_e2e checks one that has)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Training config" in card and "lora_rank: 4" in card and f"shards: {tmp_path}/shards" in card
    assert "tokens seen" in card and "## Evaluation" not in card
    # the merged export equals the unmerged fine-tuned model (LoRA modules on the source weights)
    state, run_cfg = consolidate(str(tmp_path / "run"))
    assert any(k.endswith("lora_A") for k in state)
    f = parse_section({k: run_cfg["finetune"][k] for k in ("method", "lora_rank", "lora_alpha", "lora_targets")}, "x")
    unmerged = apply_lora(Transformer(cfg), f.lora_targets, f.lora_rank, f.scale, f.train_also)
    unmerged.load_state_dict(state)
    merged = load(str(tmp_path / "merged"))
    ids = torch.randint(v.size, (2, 32))
    with torch.no_grad():
        a, b = unmerged(ids), merged(ids)
        base = load(src)(ids)
    assert (a - b).abs().max() < 1e-4
    assert (b - base).abs().max() > 1e-4      # the fine-tune changed the model
    # only the targeted projections changed
    changed = {k for k, t in merged.state_dict().items() if not torch.equal(t, load(src).state_dict()[k])}
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "up_proj")) for k in changed)


def test_finetune_config_is_merged_as_objects(tmp_path):
    """build_config: the source's ModelConfig object, init_from, no_loss and the typed finetune section
    come from --from / --modality, never from re-parsed override strings; errors name the field."""
    import argparse
    import dataclasses

    from mmfm.export import write_folder
    from mmfm.train.config import FinetuneSection
    from mmfm.train.finetune import build_config
    from mmfm.typed_config import ConfigError
    from mmfm.vocab import Vocab

    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(tmp_path / "vocab.json")
    cfg, model = _tiny(v.size)
    cfg.max_seq_len = 96                     # a field the file could not know: it must come from the source
    src = write_folder(model.state_dict(), cfg, str(tmp_path / "src"), str(tmp_path / "vocab.json"))
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"""model: {{dim: 8}}
data: {{shards: x, vocab: "{tmp_path}/vocab.json", seq_len: 64}}
objective: {{kind: ar}}
finetune: {{method: full, freeze: shared}}
""")
    args = argparse.Namespace(source=src, modality="image", config=str(ft), overrides=["train.steps=3"])
    run_cfg, f = build_config(args)
    assert run_cfg.model == cfg                                    # the source's model; the file's is ignored
    assert isinstance(f, FinetuneSection) and f is run_cfg.finetune
    assert dataclasses.asdict(f) == {**dataclasses.asdict(FinetuneSection(method="full", freeze="shared")),
                                     "modality": "image", "source": os.path.abspath(src)}
    assert run_cfg.train.init_from == os.path.abspath(src) and run_cfg.train.steps == 3
    assert set(run_cfg.objective.no_loss) == set(v.modality_names) - {"image"}
    assert run_cfg.to_dict()["finetune"]["modality"] == "image"
    with pytest.raises(ConfigError, match=r"ft.yaml: override 'model.dim=4'"):
        build_config(argparse.Namespace(**{**vars(args), "overrides": ["model.dim=4"]}))
    with pytest.raises(ConfigError, match=r"ft.yaml: finetune.lora_rnk: unknown field"):
        build_config(argparse.Namespace(**{**vars(args), "overrides": ["finetune.lora_rnk=2"]}))
    with pytest.raises(ConfigError, match=r"ft.yaml: finetune.freeze: expected none, shared"):
        build_config(argparse.Namespace(**{**vars(args), "overrides": ["finetune.freeze=all"]}))
    with pytest.raises(ConfigError, match=r"--modality 'smell'"):
        build_config(argparse.Namespace(**{**vars(args), "modality": "smell"}))
