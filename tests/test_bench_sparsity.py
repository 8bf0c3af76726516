"""mmfm bench sparsity: the FLOP-matched comparison's arithmetic and its refusals (the training runs
it compares are real `mmfm pretrain` runs; docs/benchmarks.md, "sparsity")."""
import json

import pytest

from mmfm.bench import sparsity


def test_flops_to_reach_interpolates_the_first_crossing():
    curve = [(0, 8.0), (10, 4.0), (20, 2.0), (30, 3.0), (40, 1.0)]
    assert sparsity.flops_to_reach(curve, 3.0) == pytest.approx(15.0)
    assert sparsity.flops_to_reach(curve, 8.0) == 0
    assert sparsity.flops_to_reach(curve, 1.0) == pytest.approx(40.0)
    assert sparsity.flops_to_reach(curve, 0.5) is None


def _run(tmp_path, name, sparse, evals, seq_len=64, micro_batch=2):
    folder = tmp_path / name
    folder.mkdir()
    model = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "vocab_size": 500,
             "max_seq_len": 128, "modality_sparse": sparse}
    (folder / "config.json").write_text(json.dumps({
        "model": model, "data": {"seq_len": seq_len},
        "train": {"micro_batch": micro_batch, "grad_accum": 1}, "world_size": 1}))
    rows = [{"step": s, "eval_loss": sum(ev.values()) / len(ev), **{f"eval_loss_{m}": v for m, v in ev.items()}}
            for s, ev in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_compare_reports_the_flop_fraction_per_modality(tmp_path):
    dense = sparsity.read_run(_run(tmp_path, "d", False, [(0, {"image": 8.0, "text": 8.0}),
                                                          (100, {"image": 4.0, "text": 3.0}),
                                                          (200, {"image": 3.0, "text": 2.0})]))
    sparse = sparsity.read_run(_run(tmp_path, "s", True, [(0, {"image": 8.0, "text": 8.0}),
                                                          (100, {"image": 3.0, "text": 3.5}),
                                                          (200, {"image": 2.0, "text": 2.5})]))
    recs = {r["case"]["modality"]: r for r in sparsity.compare(dense, sparse)}
    assert recs["image"]["flop_fraction"] == pytest.approx(0.5)      # MoT reached 3.0 at step 100 of 200
    assert recs["text"]["flop_fraction"] is None                      # never reached 2.0
    assert recs["image"]["train_flops"] == pytest.approx(200 * dense["flops_per_step"])
    # per step: flops_per_token(seq_len) x micro_batch x seq_len, the same on both sides (active weights)
    assert dense["flops_per_step"] == sparse["flops_per_step"] > 0


def test_runs_that_are_not_flop_matched_or_not_finished_are_refused(tmp_path):
    evals = [(0, {"image": 8.0}), (10, {"image": 4.0})]
    dense = sparsity.read_run(_run(tmp_path, "d", False, evals))
    bigger = sparsity.read_run(_run(tmp_path, "s", True, evals, micro_batch=4))
    with pytest.raises(ValueError, match="not FLOP-matched"):
        sparsity.compare(dense, bigger)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sparsity.read_run(str(tmp_path))
    with pytest.raises(ValueError, match="at least 2"):
        sparsity.read_run(_run(tmp_path, "one", False, evals[:1]))
    with pytest.raises(SystemExit):
        sparsity.main(["--tokens", "x", "--runs", "dense=a", "sparse=b"])
