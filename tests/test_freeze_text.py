"""train.freeze_text_steps (mmfm/train/freeze.py): pretraining from a small Llama (test_hf_import's,
random weights) under the real DeepSpeed engine, ZeRO 1 and 2. For the first N steps every weight but
the new (non-text) rows of embedding and head is bitwise its imported value, weight decay on; the new
rows move; after N the backbone moves. A run stopped inside the window (SIGTERM) and resumed freezes
the same steps and ends bitwise where the uninterrupted run ends. Bad values name the field. One child
process per stage (a one-rank gloo group must not live in the pytest process)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_hf_import import make_llama, paired_shards

from mmfm.typed_config import ConfigError
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)
N, STEPS = 3, 5

CHILD = r"""
import os, signal, sys
import torch
from mmfm.train.config import load_run_config
from mmfm.train.loop import run
from mmfm.train.trainer import Hooks

torch.set_num_threads(1)
config, d = sys.argv[1], sys.argv[2]
snaps = {}

def snap(engine, step):           # the module's weights after each step (ZeRO copies its partitions back)
    snaps[step] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {}

class Term(Hooks):
    def on_step_end(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

for name, hooks in (("ref", None), ("term", Term()), ("resumed", None)):
    cfg = load_run_config(config, [f"train.out={d}/{'term' if name == 'resumed' else name}"])
    run(cfg, hooks=hooks, evaluators=[snap])
    torch.save(snaps, f"{d}/{name}.pt")
    snaps = {}
"""


def setup_run(tmp_path, stage: int, extra: str = "") -> tuple:
    from mmfm.tokenizers.hf_text import import_text_tokenizer

    src = str(tmp_path / "llm")
    make_llama(src, "json")
    text = import_text_tokenizer(src, str(tmp_path / "tok"))
    vocab = Vocab(text.vocab_size, {"image": 64})
    vocab.save(tmp_path / "vocab.json")
    shards = paired_shards(str(tmp_path), vocab, text)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""deepspeed: {REPO}/configs/deepspeed/zero{stage}.json
model: {{max_seq_len: 64}}
data: {{shards: "{shards}/train-*.tar", vocab: "{tmp_path}/vocab.json", seq_len: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 1, weight_decay: 0.1}}
train: {{out: "{tmp_path}/run", steps: {STEPS}, micro_batch: 4, eval_every: 1, checkpoint_every: 0, progress: false,
        plot: false, threads: 1, init_from: "{src}", freeze_text_steps: {N}{extra}}}
""")
    return cfg, vocab


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_window_new_rows_only_then_all_and_resume(stage, tmp_path):
    cfg, vocab = setup_run(tmp_path, stage)
    p = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, term, resumed = (torch.load(tmp_path / f"{n}.pt") for n in ("ref", "term", "resumed"))
    assert sorted(ref) == list(range(STEPS + 1)) and sorted(term) == [0, 1, 2] and sorted(resumed) == [2, 3, 4, 5]
    text = vocab.ranges["text"]
    t0, t1 = text.start, text.start + text.size
    init = ref[0]
    rows = ("embed_tokens.weight", "lm_head.weight")
    assert set(rows) <= set(init)
    layers = [k for k in init if k not in rows]
    assert len(layers) > 10 and any("norm" in k for k in layers)
    for s in range(1, N + 1):
        for k in layers:
            assert torch.equal(ref[s][k], init[k]), (s, k)
        for k in rows:
            assert torch.equal(ref[s][k][t0:t1], init[k][t0:t1]), (s, k)
            moved = (ref[s][k][t1:] != init[k][t1:]).any(1).float().mean()
            assert moved > 0.5, (s, k, float(moved))        # the new rows train from the first step
    # after the window everything trains (weight decay alone moves every decayed matrix)
    end = ref[STEPS]
    assert all(not torch.equal(end[k], init[k]) for k in layers if "norm" not in k)
    # every text row of the head moves; of the embedding, the rows of the text ids the batches held
    assert (end["lm_head.weight"][t0:t1] != init["lm_head.weight"][t0:t1]).any(1).all()
    assert (end["embed_tokens.weight"][t0:t1] != init["embed_tokens.weight"][t0:t1]).any(1).sum() >= 10
    # stopped at step 2 (inside the window) and resumed: the same steps frozen, the same end, bit for bit
    assert "resumed from step 2" in p.stderr
    for k in layers:
        assert torch.equal(resumed[3][k], init[k]), k
    for s in (3, 4, 5):
        for k in init:
            assert torch.equal(resumed[s][k], ref[s][k]), (s, k)


def test_bad_values_name_the_field(tmp_path):
    from mmfm.train.config import load_run_config

    cfg, _ = setup_run(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"train\.freeze_text_steps: must be >= 0"):
        load_run_config(str(cfg), ["train.freeze_text_steps=-1"])
    with pytest.raises(ConfigError, match=r"train\.freeze_text_steps: 3 needs train\.init_from"):
        load_run_config(str(cfg), ["train.init_from=''"])
    with pytest.raises(ConfigError, match=r"train\.freeze_text_steps: supported under ZeRO stages 0-2"):
        load_run_config(str(cfg), [f"deepspeed={REPO}/configs/deepspeed/zero3.json"])
    with pytest.raises(ConfigError, match=r"train\.freeze_text_steps"):
        load_run_config(str(cfg), ["train.freeze_text_steps=two"])
    assert load_run_config(str(cfg)).train.freeze_text_steps == 3


@pytest.mark.parametrize("sparse,tie", [(True, False), (False, True), (True, True)])
def test_mixture_of_transformers_and_tied_embeddings_freeze_every_group(sparse, tie):
    """Without DeepSpeed (the hooks and the decay are the whole mechanism): every modality group's
    weights and the shared text rows of a tied embedding stay fixed in the window, then move."""
    from mmfm.models import ModelConfig, Transformer
    from mmfm.train.engine import param_groups
    from mmfm.train.freeze import TextFreeze

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, modality_sparse=sparse,
                                num_modalities=3 if sparse else 0, tie_embeddings=tie))
    init = {k: v.detach().clone() for k, v in m.state_dict().items()}
    freeze = TextFreeze(m, 0, 60, steps=2)
    opt = torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2)
    decay = [g["weight_decay"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        ids = torch.randint(0, 100, (2, 12), generator=gen)
        mods = (ids >= 60).long() + (ids >= 80).long() if sparse else None
        assert freeze.begin_step(step, opt, decay) == (step < 2)
        opt.zero_grad()
        m(ids, modality_ids=mods).logsumexp(-1).mean().backward()
        opt.step()
        now = m.state_dict()
        for k, v in now.items():
            if step < 2:
                if k in ("embed_tokens.weight", "lm_head.weight"):
                    assert torch.equal(v[:60], init[k][:60]) and not torch.equal(v[60:], init[k][60:]), (step, k)
                else:
                    assert torch.equal(v, init[k]), (step, k)
            elif step == 3 and v.dim() >= 2:
                assert not torch.equal(v, init[k]), k
