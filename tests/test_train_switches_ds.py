"""The memory and speed switches through `mmfm pretrain`'s loop under DeepSpeed ZeRO-3 (one driver
process, tests/train_modes_run.py, 3 steps each on the tiny model with packed, document-masked
rows): ZeRO-3 parameter offload and full activation checkpointing give the plain ZeRO-3 run's
losses and gradient norms; bf16 autocast keeps DeepSpeed's bf16 off and the weights fp32, and its
losses follow fp32's to bf16 precision; every log row carries the peak memory."""
import pytest
from ds_tiny_runs import series as _series, tiny_runs

SWITCHES = {"plain": [], "offload_params": ["train.offload_params=true"],
            "checkpointing": ["train.activation_checkpointing=full"], "autocast": ["train.precision=bf16_autocast"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("switches"), SWITCHES, "zero3.json", samples=60, timeout=900)


@pytest.mark.parametrize("name", ["offload_params", "checkpointing"])
def test_zero3_switch_gives_the_plain_losses_and_gradients(runs, name):
    plain, run = runs["plain"], runs[name]
    assert run["zero_stage"] == 3 and run["offload_param"] == (name == "offload_params")
    assert len(_series(run, "loss")) == 3
    for key in ("loss", "grad_norm"):
        for a, b in zip(_series(run, key), _series(plain, key)):
            assert abs(a - b) <= 1e-5 * abs(b), (name, key, _series(run, key), _series(plain, key))


def test_bf16_autocast_keeps_fp32_master_weights(runs):
    plain, run = runs["autocast"], runs["plain"]
    assert runs["autocast"]["bf16"] is False and runs["autocast"]["param_dtype"] == "torch.float32"
    for a, b in zip(_series(runs["autocast"], "loss"), _series(plain, "loss")):
        assert abs(a - b) < 0.02 * b
    assert _series(runs["autocast"], "loss") != _series(run, "loss")     # the forward did run in bf16


def test_every_log_row_has_the_peak_memory(runs):
    for run in runs.values():
        rows = [r for r in run["rows"] if "loss" in r]
        assert all(r["peak_memory_kind"] == "cpu_peak_rss" and 50 < r["peak_memory_mb"] < 64_000 for r in rows)
        assert all(b["peak_memory_mb"] >= a["peak_memory_mb"] for a, b in zip(rows, rows[1:]))   # a peak never falls
