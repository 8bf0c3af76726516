"""train.compile through the real Trainer and DeepSpeed engine (`mmfm pretrain`'s loop, ZeRO-2, one
driver process: tests/train_modes_run.py), for the dense decoder and Mixture-of-Transformers
(modality_sparse): 3 steps on the tiny model with packed, document-masked rows, compiled with
aot_eager (Dynamo + AOTAutograd, as inductor traces, without its C++ code generation, which costs
minutes on this CPU), against the same runs eager. The losses and gradient norms agree to 1e-5
relative; the dense model compiles to one graph with no break; Mixture-of-Transformers breaks only
in its token routing (make_plan: per-modality row counts are data), never in the loss head."""
import pytest
from ds_tiny_runs import series as _series, tiny_runs

RUNS = {"dense": [], "dense_compiled": ["train.compile=true", "train.compile_backend=aot_eager"],
        "mot": ["model.modality_sparse=true"],
        "mot_compiled": ["model.modality_sparse=true", "train.compile=true", "train.compile_backend=aot_eager"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("compile_ds"), RUNS, "zero2.json", samples=40, timeout=1500)


@pytest.mark.parametrize("arch", ["dense", "mot"])
def test_compiled_training_in_the_deepspeed_engine_follows_eager(runs, arch):
    eager, compiled = runs[arch], runs[f"{arch}_compiled"]
    assert compiled["compiled"] and not eager["compiled"] and compiled["zero_stage"] == 2
    assert compiled["params"] == eager["params"]
    assert (runs["mot"]["params"] > runs["dense"]["params"]) if arch == "mot" else True   # MoT: weights per modality
    assert eager["head_calls"]["logits"] == 0 < eager["head_calls"]["fused_loss"]   # (compiled runs are not counted)
    assert len(_series(compiled, "loss")) == 3
    for key in ("loss", "grad_norm"):
        for a, b in zip(_series(compiled, key), _series(eager, key)):
            assert abs(a - b) <= 1e-5 * abs(b), (arch, key, _series(compiled, key), _series(eager, key))
    if arch == "dense":
        assert compiled["graphs"] == 1 and compiled["graph_breaks"] == [], compiled["graph_breaks"]
    else:
        assert compiled["graphs"] >= 1 and not any("loss" in b for b in compiled["graph_breaks"])
