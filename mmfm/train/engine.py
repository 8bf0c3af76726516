"""DeepSpeed on this machine: environment defaults, the engine, the learning-rate schedule.

Runs as a single process with no launcher: when RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are
absent, `setup_environment` sets a one-process rendezvous (port from MMFM_MASTER_PORT or a free
one). Under torchrun or the deepspeed launcher they are already set and used. Without CUDA,
DS_ACCELERATOR defaults to cpu and the backend is gloo. In a source checkout TORCH_EXTENSIONS_DIR
defaults to <repo>/.torch_extensions, so DeepSpeed's JIT ops (shm_comm, ~35 s) compile once per
checkout; an installed mmfm leaves torch's default (~/.cache/torch_extensions), not site-packages.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch

from mmfm.train.config import OptimSection, TrainSection

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.path.isdir(os.path.join(REPO_ROOT, "csrc")):   # a source checkout; an installed mmfm keeps torch's default
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".torch_extensions"))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("MMFM_MASTER_PORT") or str(_free_port()))


def init_distributed() -> None:
    setup_environment()
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from base to base * min_ratio at `total`.
    step is the 0-based index of the optimizer step about to be taken."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class EngineSpec:
    """What the engine is built from, whichever config file it came from: the shared typed optimizer
    and training sections (mmfm/train/config.py) and the plain DeepSpeed JSON. Pretraining and
    cache augmentation take theirs from their files (`spec_of`); tokenizer training fills the same
    sections from its own `train:` fields (mmfm/tokenizers/train.py: engine_spec)."""
    optim: OptimSection
    train: TrainSection
    deepspeed: dict
    deepspeed_path: str = ""


def spec_of(cfg) -> EngineSpec:
    """A RunConfig or AugConfig (both have optim, train, deepspeed and deepspeed_path) -> EngineSpec."""
    return EngineSpec(cfg.optim, cfg.train, cfg.deepspeed, cfg.deepspeed_path)


def deepspeed_config(spec: EngineSpec, world_size: int) -> dict:
    """The JSON from configs/deepspeed plus batch, accumulation, clipping and precision from the spec."""
    from mmfm.typed_config import ConfigError

    ds = dict(spec.deepspeed)
    t = spec.train
    ours = {"train_micro_batch_size_per_gpu": t.micro_batch, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch * t.grad_accum * world_size, "gradient_clipping": spec.optim.clip}
    for k, v in ours.items():
        if k in ds and ds[k] != v:
            raise ConfigError(f"{spec.deepspeed_path or 'deepspeed'}: {k} is {ds[k]!r} but the run config gives {v!r}; "
                              "leave it out of the JSON (batch, accumulation and clipping come from the run config)")
        ds[k] = v
    ds["bf16"] = {"enabled": t.precision == "bf16"}   # bf16_autocast keeps fp32 weights: the trainer autocasts
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    if t.offload_optimizer:
        ds.setdefault("zero_optimization", {}).setdefault("offload_optimizer", {"device": "cpu"})
    if getattr(t, "offload_params", False):
        # pin_memory only where there is a device to copy to (pinned pages buy nothing on a CPU run)
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}),
                                   "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}
    return ds


def apply_model_switches(spec: EngineSpec, model):
    """train.activation_checkpointing and train.compile on the model, before DeepSpeed wraps it.
    compile is nn.Module.compile (in place): parameter names, hence checkpoints, are unchanged."""
    from mmfm.typed_config import ConfigError

    t = spec.train
    mode = getattr(t, "activation_checkpointing", "none")
    if mode != "none":
        if not hasattr(model, "set_activation_checkpointing"):
            raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support it "
                              "(mmfm's Transformer does); set none")
        model.set_activation_checkpointing(mode)
    if getattr(t, "compile", False):
        model.compile(backend=t.compile_backend)
    return model


def autocast(spec: EngineSpec):
    """The context the forward runs in: bf16 autocast for train.precision bf16_autocast, else nothing."""
    import contextlib

    if spec.train.precision != "bf16_autocast":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "norm" in n or "embed_tokens" in n or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def offloads_optimizer(spec: EngineSpec) -> bool:
    """train.offload_optimizer, or a DeepSpeed JSON (zero2_offload.json) that offloads to cpu/nvme."""
    zero = spec.deepspeed.get("zero_optimization", {}) or {}
    off = zero.get("offload_optimizer") or {}
    return bool(spec.train.offload_optimizer) or (isinstance(off, dict) and off.get("device", "none") != "none")


def build_engine(spec: EngineSpec, model):
    """deepspeed.initialize with a client optimizer (torch AdamW; no cpu_adam JIT), or DeepSpeedCPUAdam
    when the optimizer is offloaded (train.offload_optimizer or the JSON's offload_optimizer):
    ZeRO-Offload refuses other client optimizers."""
    import deepspeed

    o = spec.optim
    model = apply_model_switches(spec, model)
    groups = param_groups(model, o.weight_decay)
    if offloads_optimizer(spec):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    ds_config = deepspeed_config(spec, torch.distributed.get_world_size())
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine, optimizer


def zero_stage(spec) -> int:
    return int(spec.deepspeed.get("zero_optimization", {}).get("stage", 0))


def measure_peak_flops(dtype=torch.float32, n: int = 512, reps: int = 5, probes: int = 3) -> float:
    """Achieved FLOP/s of an n x n matmul in this process, the best of `probes` timings of `reps`
    matmuls each: the MFU denominator when no peak is given. The best, not the mean, because on a
    shared machine a probe can only be slowed down by other work, never sped up."""
    import time

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(probes):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / max(time.perf_counter() - t0, 1e-12))
    return best


class PeakFlops:
    """The MFU denominator of one process: train.peak_flops when given (> 0), else a matmul probe.

    A probe taken while other work shares the cores reads low, and every later MFU reads high, above
    1 when the load lifts. So a measured peak is re-probed when an MFU would exceed 1 and the best
    seen is kept (at most `max_reprobes` times a run: a model that beats the 512 x 512 probe, e.g. in
    larger matmuls, keeps an honest MFU > 1 rather than a probe every log row). A given peak is
    never re-probed: it is the user's denominator. `source` says where the value came from."""

    def __init__(self, given: float, dtype=torch.float32, probe=None, max_reprobes: int = 3):
        self.given = float(given)
        self.probe = probe or (lambda: measure_peak_flops(dtype))
        self.max_reprobes = max_reprobes
        self.reprobes = 0
        self.value = self.given or float(self.probe())
        self.source = "config" if self.given else "measured"

    def mfu(self, model_flops_per_s: float) -> float:
        """model FLOP/s achieved per process / peak, re-probing a measured peak that reads too low."""
        while (model_flops_per_s > self.value and not self.given and self.reprobes < self.max_reprobes):
            self.reprobes += 1
            again = float(self.probe())
            if again > self.value:
                self.value, self.source = again, "reprobed"
        return model_flops_per_s / self.value
