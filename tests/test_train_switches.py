"""The memory and speed switches of a train section (docs/training.md, "Memory and speed
switches"), each against the plain path: activation checkpointing (full, selective) and
torch.compile of the model give the same loss and gradients; bf16 autocast keeps fp32 weights and
gives the fp32 loss and gradients to bf16 precision; every mmfm op traces under
torch.compile(fullgraph=True) through its fake implementation (mmfm/ops/fake.py). ZeRO-3 parameter
offload and the switches under DeepSpeed: tests/test_train_switches_ds.py."""
import pytest
import torch

from mmfm.models import Transformer
from mmfm.models.config import ModelConfig
from mmfm.objectives import ObjectiveConfig, build_objective, model_loss_and_report
from mmfm.train.config import TrainSection
from mmfm.train.engine import EngineSpec, apply_model_switches, autocast
from mmfm.vocab import Vocab

VOCAB = Vocab(48, {"image": 32})


def setup(seed: int, **model_kw):
    torch.manual_seed(seed)
    cfg = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, vocab_size=VOCAB.size)
    model = Transformer(ModelConfig(**{**cfg, **model_kw})).train()
    ids = torch.randint(0, VOCAB.size - 8, (3, 40), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = VOCAB.bos_id
    ids[:, 17] = VOCAB.bos_id     # two packed samples per row: the document-mask path too
    obj = build_objective(ObjectiveConfig(kind="ar", document_mask=True), VOCAB)
    return model, obj, obj.prepare(ids, VOCAB.modality_table()[ids], torch.ones_like(ids, dtype=torch.bool))


def loss_and_grads(model, obj, prep, ctx=None):
    model.zero_grad()
    with ctx if ctx is not None else torch.enable_grad():
        loss, _, _ = model_loss_and_report(model, prep, obj.weights)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def spec(**train) -> EngineSpec:
    from mmfm.train.config import OptimSection

    return EngineSpec(OptimSection(), TrainSection(**train), {})


def backward_ops(model, obj, prep) -> dict:
    """aten ops run during backward, by name: what activation checkpointing recomputes shows here."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    loss = model_loss_and_report(model, prep, obj.weights)[0]
    with Count() as c:
        loss.backward()
    return c.ops


@pytest.mark.parametrize("seed,arch", [(0, {}), (1, {"modality_sparse": True, "num_modalities": 3})])
def test_activation_checkpointing_gives_the_plain_loss_and_gradients_and_saves_memory(seed, arch):
    model, obj, prep = setup(seed, **arch)
    ref_loss, ref = loss_and_grads(model, obj, prep)
    plain = backward_ops(model, obj, prep)
    ops = {}
    for mode in ("full", "selective"):
        apply_model_switches(spec(activation_checkpointing=mode), model)
        loss, grads = loss_and_grads(model, obj, prep)
        assert torch.equal(loss, ref_loss), mode
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], atol=1e-6, rtol=1e-5, msg=f"{mode}: {n}")
        ops[mode] = backward_ops(model, obj, prep)
    # full recomputes each block's matmuls in backward; selective keeps their outputs and recomputes
    # only the elementwise work (the RMSNorm's rsqrt here), which the plain path saved
    mm = lambda c: c["mm"] + c["addmm"] + c["bmm"]  # noqa: E731
    assert mm(ops["full"]) > mm(ops["selective"]) == mm(plain), (ops, plain)
    assert ops["selective"]["rsqrt"] > plain["rsqrt"] and ops["full"]["rsqrt"] > plain["rsqrt"]
    model.set_activation_checkpointing("none")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        model.set_activation_checkpointing("some")


def test_compiled_model_gives_the_eager_loss_and_gradients_without_graph_breaks():
    """train.compile through apply_model_switches (nn.Module.compile: parameter names unchanged).
    aot_eager traces forward and backward as inductor would, without its C++ code generation. The
    whole loss forward -- embedding, blocks with the document mask, final norm and the fused loss
    head, whose labelled-row selection runs inside an opaque op (masked_linear_cross_entropy) -- is
    one graph with no break; fullgraph=True, which raises on any break, agrees. Tolerance: loss
    1e-5, gradients 1e-5 + 1e-4 relative (aot_eager's decompositions reorder a few fp32 sums)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, obj, prep = setup(2, n_layers=1)
    ref_loss, ref = loss_and_grads(model, obj, prep)
    names = [n for n, _ in model.named_parameters()]
    torch._dynamo.reset()
    counters.clear()
    apply_model_switches(spec(compile=True, compile_backend="aot_eager"), model)
    assert [n for n, _ in model.named_parameters()] == names
    loss, grads = loss_and_grads(model, obj, prep)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    fwd = torch.compile(model.forward, fullgraph=True, backend="aot_eager")   # raises on any graph break
    w = obj.weights[prep.label_mod] * (prep.labels != -100)
    total, ce = fwd(prep.input_ids, prep.modality_ids, labels=prep.labels, label_weights=w, doc_ids=prep.doc_ids)
    torch.testing.assert_close(total / w.sum(), ref_loss, atol=1e-5, rtol=1e-5)
    assert ce.shape == prep.labels.shape and bool((ce[prep.labels == -100] == 0).all())


def test_bf16_autocast_keeps_fp32_weights_and_the_fp32_loss():
    model, obj, prep = setup(3)
    ref_loss, ref = loss_and_grads(model, obj, prep)
    s = spec(precision="bf16_autocast")
    loss, grads = loss_and_grads(model, obj, prep, autocast(s))
    assert all(p.dtype == torch.float32 for p in model.parameters())        # the master weights stay fp32
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert abs(float(loss) - float(ref_loss)) < 0.02 * float(ref_loss)
    flat = lambda d: torch.cat([d[n].flatten() for n in ref])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(grads), flat(ref), dim=0)
    assert cos > 0.99, float(cos)
    assert not torch.equal(loss, ref_loss)    # autocast really ran the matmuls in bf16
    with autocast(spec(precision="fp32")):
        assert not torch.is_autocast_enabled("cpu")


def _op_cases():
    B, V = 3, 11
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    params = torch.tensor([[1.0, 0, 1, 0, 1, 1, 0, 0]] * B)
    lv = torch.tensor([3, 5, 4, 2])
    cache = torch.zeros(2, 2, 8, 4)
    probs = lambda *s: torch.softmax(torch.randn(*s, generator=g), -1)  # noqa: E731
    return {
        "nearest_code": (z, cb, 2, False), "code_stats": (z, torch.tensor([0, 1, 2, 0, 1, 4]), 5),
        "ema_codebook_update": (torch.ones(5), torch.randn(5, 4, generator=g), torch.ones(5),
                                torch.randn(5, 4, generator=g), 0.9, 1e-5, 0.1),
        "fsq_quantize": (z, lv), "fsq_indices_to_codes": (torch.tensor([0, 3, 7]), lv),
        "fsq_codes_to_indices": (torch.zeros(3, 4), lv), "lfq_quantize": (z,),
        "lfq_indices_to_codes": (torch.tensor([0, 3, 7]), 4), "lfq_entropy": (z, 1.0, True),
        "lfq_entropy_backward": (torch.ones(2), z, 1.0, True), "residual_vq": (z, torch.randn(2, 5, 4, generator=g)),
        "sample": (torch.randn(B, V, generator=g), params, None, None, None, 1, 0, torch.tensor([4, 0, 4])),
        "processed_probs": (torch.randn(B, V, generator=g), params, None, None, None),
        "verify_chain": (probs(B, 3, V), probs(B, 2, V), torch.randint(0, V, (B, 2), generator=g), 1, 0),
        "verify_multi_draft": (probs(B, V), probs(B, V), torch.randint(0, V, (B, 2), generator=g), True, 1, 0),
        "kv_append": (cache.clone(), torch.randn(2, 2, 3, 4, generator=g), torch.tensor([0, 2]), None),
        "kv_insert": (cache.clone(), torch.tensor([3, 4]), torch.tensor([1, 0]), torch.randn(2, 2, 2, 4, generator=g)),
        "kv_gather_rows": (cache, torch.tensor([1, 0, 1])),
        "decode_linear": (torch.randn(3, 5, generator=g), torch.randn(2, 5, 16, generator=g), 20, 0.5,
                          torch.randn(3, 20, generator=g), False),
        "decode_attention": (torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g),
                             torch.randn(2, 2, 10, 8, generator=g), torch.tensor([4, 7]),
                             torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool), False),
    }


def test_every_mmfm_op_has_a_fake_and_compiles_fullgraph():
    """opcheck compares each fake's shapes, dtypes and devices with the kernel's outputs; then each
    op runs inside torch.compile(fullgraph=True), which fails on an op that cannot be traced, and
    gives the eager results (random ops: the same seed gives the same draws)."""
    from mmfm._ext import compiled_ops, extension_loaded

    if not extension_loaded():
        pytest.fail("mmfm._C is not built: the fake implementations register on its ops")
    cases = _op_cases()
    assert sorted(cases) == compiled_ops()          # a new op needs a fake (mmfm/ops/fake.py) and a case here
    import torch._dynamo

    for name, args in cases.items():
        op = getattr(torch.ops.mmfm, name).default
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        clone = lambda a: [x.clone() if isinstance(x, torch.Tensor) else x for x in a]  # noqa: E731
        eager_args, comp_args = clone(args), clone(args)
        want = op(*eager_args)
        torch._dynamo.reset()     # one traced lambda per op, not recompilations of one
        got = torch.compile(lambda *a, _op=op: _op(*a), fullgraph=True, backend="aot_eager")(*comp_args)
        for w, h in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            if w is not None:
                torch.testing.assert_close(h, w, msg=name)
        torch.testing.assert_close(comp_args[0], eager_args[0], msg=f"{name}: in-place result")


def test_doctor_prints_the_latest_runs_peak_memory(tmp_path, monkeypatch):
    """mmfm doctor's peak-memory row reads the newest metrics.jsonl under ./runs (or --run DIR)."""
    import json
    import os
    import time

    from mmfm.doctor import peak_memory_row
    from mmfm.train.metrics import JsonlLogger, peak_memory

    monkeypatch.chdir(tmp_path)
    assert "no training metrics found" in peak_memory_row()[1]
    for i, name in enumerate(("old", "new")):
        log = JsonlLogger(f"runs/{name}/pretrain/metrics.jsonl")
        log(1, {"loss": 1.0, **peak_memory()})
        log(2, {"loss": 0.9, "peak_memory_mb": 123.4 + i, "peak_memory_kind": "cpu_peak_rss"})
        log(2, {"eval_loss": 0.8})                              # an eval row without the figure
        os.utime(f"runs/{name}/pretrain/metrics.jsonl", (time.time() + i, time.time() + i))
    assert peak_memory_row()[1].startswith("124.4 MB (cpu_peak_rss) at step 2 of runs/new/pretrain/metrics.jsonl")
    assert peak_memory_row("runs/old/pretrain")[1].startswith("123.4 MB")
    first = json.loads(open("runs/old/pretrain/metrics.jsonl").readline())
    assert first["peak_memory_kind"] == "cpu_peak_rss" and first["peak_memory_mb"] > 10


def test_switch_fields_are_typed_and_checked():
    from mmfm.train.config import load_run_config
    from mmfm.typed_config import ConfigError

    cfg = load_run_config("configs/pretrain/demo.yaml", ["train.activation_checkpointing=selective", "train.compile=true",
                                                         "train.precision=bf16_autocast", "train.offload_params=true",
                                                         "deepspeed=configs/deepspeed/zero3.json"])
    t = cfg.train
    assert (t.activation_checkpointing, t.compile, t.precision, t.offload_params) == ("selective", True, "bf16_autocast", True)
    for bad, field in [(["train.activation_checkpointing=half"], "train.activation_checkpointing"),
                       (["train.compile=3"], "train.compile"), (["train.precision=fp16"], "train.precision"),
                       (["train.offload_params=true"], "train.offload_params"),      # demo.yaml is ZeRO-2
                       (["objective.loss_on=caption"], "objective.loss_on"),
                       (["train.peak_flops=-1e12"], "train.peak_flops"), (["train.peak_flops=.inf"], "train.peak_flops"),
                       (["train.peak_flops=fast"], "train.peak_flops")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_run_config("configs/pretrain/demo.yaml", bad)
    # loss_on generated is the masked (MaskGIT) and hybrid objectives' segment masking too
    for kind in ("masked", "hybrid"):
        cfg = load_run_config("configs/pretrain/demo.yaml", [f"objective.kind={kind}", "objective.loss_on=generated"])
        assert (cfg.objective.kind, cfg.objective.loss_on) == (kind, "generated")


def test_a_peak_measured_too_low_is_reprobed_instead_of_giving_an_mfu_above_one():
    """A probe slowed by other work reads low and every later MFU reads high: measured once (the old
    trainer), a step running at twice that probe logged MFU 2. Here the first probe is a real but
    overhead-bound 2 x 2 matmul (~1000x below the machine's rate, as a probe on a swamped core), the
    re-probe the real 512 x 512 probe: the MFU comes back <= 1 and the row's source says reprobed."""
    from mmfm.train.engine import PeakFlops, measure_peak_flops

    calls = []

    def probe():
        calls.append(1)
        return measure_peak_flops(n=2, reps=1, probes=1) if len(calls) == 1 else measure_peak_flops()

    peak = PeakFlops(0.0, probe=probe)
    low = peak.value
    assert peak.source == "measured" and len(calls) == 1
    achieved = 2 * low                               # what the old trainer divided by `low`: MFU 2
    mfu = peak.mfu(achieved)
    assert mfu <= 1 and peak.value > achieved and peak.source == "reprobed" and len(calls) == 2
    assert peak.mfu(achieved) == mfu and len(calls) == 2      # no probe while MFU <= 1
    stuck = PeakFlops(0.0, probe=lambda: low, max_reprobes=3)  # a probe that cannot get faster:
    assert stuck.mfu(achieved) == 2.0 and stuck.reprobes == 3  # a bounded number of tries, MFU reported as is
    given = PeakFlops(1e9, probe=probe)              # train.peak_flops is the user's denominator: never probed
    assert given.mfu(2e9) == 2.0 and given.source == "config" and len(calls) == 2
    assert measure_peak_flops(probes=3) > 0
