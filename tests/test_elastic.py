"""Elastic resume and multi-node launch under DeepSpeed ZeRO-2 on CPU (gloo), through
tests/elastic_run.py (loop.run as `mmfm pretrain` calls it, stopped by SIGTERM after a given step,
every global batch it trains on written down).

- 2 -> 1 -> 2 ranks: a run checkpointed at 2 ranks resumes at 1 (the ZeRO shards converted to
  DeepSpeed's universal checkpoint and re-partitioned), checkpoints at 1, resumes at 2. At the same
  global batch (grad_accum makes up the missing rank), it trains on exactly the uninterrupted
  run's rows, in order, and its losses are the uninterrupted run's (to float tolerance: 1 and 2
  ranks sum gradients in a different order).
  The first 2-rank phase is two torchrun agents on this host as two nodes (--nnodes 2, c10d
  rendezvous), one rank each: the multi-node launch, trained as one 2-rank job.
- ZeRO-3's universal load (the elastic path) continues an uninterrupted run bit for bit at one
  rank (tests/zero3_universal_run.py).
Sized for 2 cores: the tiny model, 6 steps, 64-token rows."""
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)
DRIVER = "tests/elastic_run.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, timeout=600):
    p = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}:\n{p.stderr[-4000:]}")
    return p


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}"]


def _rows(path) -> list:
    return [row for line in open(path) for row in json.loads(line)["rows"]]


def _losses(path) -> dict[int, float]:
    return {int(k): v for k, v in json.load(open(path))["losses"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus, the run config (ZeRO-2, global batch 4 = micro 2 x 2 ranks, or x grad_accum 2 at 1
    rank) and the uninterrupted 1-rank run."""
    from mmfm.train.tokens import synthetic_token_corpus
    from mmfm.vocab import Vocab

    d = tmp_path_factory.mktemp("elastic")
    v = Vocab(64, {"image": 32, "audio": 32})
    v.save(d / "vocab.json")
    synthetic_token_corpus(str(d / "shards"), v, n=200)
    cfg = d / "run.yaml"
    cfg.write_text(f"""model: {REPO}/configs/models/tiny.yaml
deepspeed: {REPO}/configs/deepspeed/zero2.json
data: {{shards: {d}/shards, vocab: {d}/vocab.json, seq_len: 64, shuffle_buffer: 32}}
optim: {{lr: 0.003, warmup_steps: 2}}
train: {{steps: 6, micro_batch: 2, grad_accum: 1, log_every: 1, checkpoint_every: 0, progress: false, plot: false}}
""")
    _run([sys.executable, DRIVER, str(cfg), str(d / "ref.json"), "0", f"train.out={d}/ref", "train.grad_accum=2"])
    return d, cfg


def _two_nodes(args: list[str], timeout: int = 600) -> list[str]:
    """Runs DRIVER ARGS as two torchrun agents on this host, one rank each, as two nodes (c10d
    rendezvous); returns their stderr."""
    port = _port()
    procs = []
    for node in range(2):
        # is_host says which agent serves the rendezvous store: both are on 127.0.0.1 here, where
        # each would otherwise take itself for the endpoint's host
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mmfm-test",
               f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}", "--local-addr=127.0.0.1", DRIVER, *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    return errs


def test_two_nodes_then_1_rank_then_2_ranks_train_the_uninterrupted_rows_and_losses(reference):
    d, cfg = reference
    out = f"train.out={d}/elastic"
    # 2 ranks as two nodes (two torchrun agents), SIGTERM after step 2: save and stop
    _two_nodes([str(cfg), str(d / "a.json"), "2", out])
    a = json.load(open(d / "a.json"))
    assert a["world_size"] == 2 and a["step"] == 2 and a["stopped_by"] == "SIGTERM"
    ck = sorted(os.listdir(d / "elastic/checkpoints/step_00000002"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in ck and "mmfm_rank1.pt" in ck   # both nodes' shards
    # 1 rank (grad_accum 2 keeps the global batch), to step 4; then 2 ranks to the end
    b = _run([sys.executable, DRIVER, str(cfg), str(d / "b.json"), "4", out, "train.grad_accum=2"])
    c = _run(_torchrun(2) + [DRIVER, str(cfg), str(d / "c.json"), "0", out])
    assert "elastic resume: the checkpoint was written by 2 ranks, this run has 1" in b.stderr, b.stderr[-2000:]
    assert "elastic resume: the checkpoint was written by 1 ranks, this run has 2" in c.stderr, c.stderr[-2000:]
    assert "global row 8" in b.stderr and "global row 16" in c.stderr
    assert "warning: global batch" not in b.stderr + c.stderr
    # each resume converted its predecessor's ZeRO shards once, inside that checkpoint's folder
    assert os.path.isdir(d / "elastic/checkpoints/step_00000004/universal/zero")
    # the rows trained on: the uninterrupted run's, each once, in order
    ref_rows = _rows(d / "ref.json.rows.jsonl")
    rows = _rows(d / "a.json.rows.jsonl") + _rows(d / "b.json.rows.jsonl") + _rows(d / "c.json.rows.jsonl")
    assert len(ref_rows) == 6 * 4 and rows == ref_rows
    # the losses: phase by phase, the uninterrupted run's
    ref = _losses(d / "ref.json")
    assert sorted(_losses(d / "a.json")) == [1, 2] and sorted(_losses(d / "b.json")) == [3, 4]
    got = {**_losses(d / "a.json"), **_losses(d / "b.json"), **_losses(d / "c.json")}
    assert sorted(got) == list(range(1, 7)) and ref[6] < ref[1]
    for s in range(1, 7):
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got, ref)


def test_a_resume_at_another_world_size_refuses_a_rank_sharded_data_state(reference):
    """The Trainer's own data is rank-independent; a loader that shards by rank must say why it
    cannot follow (the field and both values), not silently skip or repeat samples."""
    from mmfm.data.dataset import ShardDataset, ShardLoader

    d, _ = reference
    saved = ShardLoader(ShardDataset(str(d / "shards"), rank=0, world_size=2, batch_size=2), num_workers=0)
    state = saved.state_dict()
    now = ShardLoader(ShardDataset(str(d / "shards"), rank=0, world_size=1, batch_size=2), num_workers=0)
    with pytest.raises(ValueError, match="world_size was 2 when saved, is 1 now"):
        now.load_state_dict(state)


def test_zero3_universal_resume_continues_bit_for_bit(tmp_path):
    """The universal load an elastic ZeRO-3 resume takes (checkpoint.load_universal), at one rank so
    no reduction order changes: the 2 steps after it give the uninterrupted losses bit for bit. It
    failed before load_universal gave each param group its own Adam step: DeepSpeed 0.19 stores one
    step tensor for all of them and AdamW increments it in place once per group, so the second
    group's bias correction was a step ahead (the 5e-4 of the 2 -> 4 rank resume)."""
    _run([sys.executable, "tests/zero3_universal_run.py", str(tmp_path / "ck"), str(tmp_path / "out.json")])
    r = json.load(open(tmp_path / "out.json"))
    assert r["groups"] == 2 and not r["shared_step"] and r["steps"] == [4.0, 4.0], r
    assert r["resumed"] == r["uninterrupted"], r
