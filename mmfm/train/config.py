"""Typed pretrain / finetune configs (configs/pretrain/<name>.yaml) with `section.field=value` overrides.

    model: ../models/small.yaml             # a model config file (relative to this file), or an inline mapping
    deepspeed: ../deepspeed/zero2.json      # plain DeepSpeed JSON (relative to this file): ZeRO section etc.
    data: {...}                             # DataSection: token shards, vocabulary, sequence length
    objective: {...}                        # mmfm.objectives.ObjectiveConfig
    optim: {...}                            # OptimSection: AdamW, warmup + cosine
    train: {...}                            # TrainSection: steps, batch, precision, checkpoints, logs
    finetune: {...}                         # FinetuneSection (mmfm finetune only): full or LoRA, freezing

Batch size, accumulation, clipping and precision live here, not in the JSON: the trainer writes
them into the DeepSpeed config (a JSON that also sets one of them must agree, or the run stops
naming the key). Unknown or ill-typed fields stop with the file and field named.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from mmfm.models.config import ModelConfig, load_model_config, model_config_from_dict
from mmfm.models.lora import LORA_TARGETS
from mmfm.objectives import ObjectiveConfig, objective_config_from_dict
from mmfm.typed_config import ConfigError, from_dict, packaged_config, read_sections


@dataclass
class DataSection:
    shards: str = ""            # token shards (mmfm/train/tokens.py), folder / brace / glob
    eval_shards: str = ""       # held-out token shards for per-modality eval ("" = none)
    vocab: str = ""             # vocab.json of the unified vocabulary
    seq_len: int = 256
    shuffle_buffer: int = 64
    eval_sequences: int = 16    # held-out sequences evaluated (fixed set)
    # "concat": cut the concatenated stream every seq_len tokens (a sample may be split, its tail
    # trained without its caption); "whole": a sample that fits is never split (mmfm.data.pipeline)
    pack: str = "concat"
    # per-modality sampling weights, e.g. {image: 0.4, text: 0.1}: each training sample is drawn from
    # modality m with probability w_m / sum(w) (empty = the shards' own order and proportions;
    # modalities not named are left out). mmfm.train.tokens.token_dataset; the log's mix_<m> is
    # the realised share of labelled tokens
    mix: dict[str, float] = field(default_factory=dict)
    # several shard sets by name, e.g. {web: "web/tokens-*.tar", books: "books/*.tar"}, instead of
    # `shards`; source_weights: {web: 0.7, books: 0.3} (a source not named weighs 1). Without mix a
    # sample comes from source s with probability w_s / sum(w); with mix, modality m keeps its share
    # mix_m and the sources holding m split it by their weights (mmfm.train.tokens.mixture_sources).
    # The log's mix_source_<s> is the realised share of the step's tokens
    sources: dict[str, str] = field(default_factory=dict)
    source_weights: dict[str, float] = field(default_factory=dict)
    # draw shards with replacement, forever (epoch-free streaming; always on with mix or sources)
    resampled: bool = False
    # probability that a caption-then-modality training sample loses its caption (classifier-free
    # guidance's unconditional branch: mmfm.train.tokens.caption_dropout)
    caption_dropout: float = 0.0


GUIDED_MODALITIES = ("image", "audio", "video", "shape3d", "physics")


@dataclass
class PromptEvalSection:
    """`eval_prompts:` of a pretrain config: the prompt-following scorers (mmfm/eval) run beside the
    held-out loss at the start, every train.eval_every steps and at the end, logged as prompts/<task>.
    The train layer only carries these fields; `mmfm pretrain` (mmfm/cli.py) builds the evaluator
    with mmfm.eval.training, so train/ does not import eval/."""
    n: int = 0                  # prompts per task (0 = off)
    corpus: str = ""            # the demo corpus the tokens were made from (mmfm data demo / mmfm demo)
    tokenizers: str = ""        # folder of <modality>/tokenizer.yaml, or <modality>/tokenizer/tokenizer.yaml
    modalities: list[str] = field(default_factory=list)   # empty = every modality of the vocabulary
    cache_dir: str = ""         # fitted scorers ("" = <corpus>/.scorers)
    cfg_scale: float = 1.0      # classifier-free guidance of the generations (1 = off)
    cfg_by_modality: dict[str, float] = field(default_factory=dict)   # per modality, overriding cfg_scale


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0           # DeepSpeed gradient_clipping (0 = off)


@dataclass
class TrainSection:
    out: str = "runs/pretrain"
    steps: int = 100
    micro_batch: int = 4        # sequences per rank per micro-step
    grad_accum: int = 1
    # fp32; bf16 (DeepSpeed's bf16: bf16 weights, fp32 master copy in the optimizer); or bf16_autocast
    # (fp32 weights and optimizer, matmuls of the forward in bf16 under torch.autocast)
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0         # 0 = at the start and the end only
    checkpoint_every: int = 50
    keep_last: int = 2
    max_bad_steps: int = 3      # consecutive non-finite steps before the run stops
    progress: bool = True
    threads: int = 0            # torch threads per process (0 = torch's default)
    peak_flops: float = 0.0     # per process, for MFU; 0 = measured (best of matmul probes; re-probed if MFU > 1)
    offload_optimizer: bool = False  # ZeRO-Offload: DeepSpeedCPUAdam (JIT-compiles cpu_adam once)
    # memory and speed switches (docs/training.md, "Memory and speed switches"); each gives the plain
    # path's loss and gradients (tests/test_train_switches.py)
    activation_checkpointing: str = "none"   # none, full (recompute each block), selective (keep matmuls)
    compile: bool = False                    # torch.compile the model (nn.Module.compile, names unchanged)
    compile_backend: str = "inductor"        # torch.compile backend (aot_eager: trace without codegen)
    offload_params: bool = False             # ZeRO-3 parameter offload to CPU memory (needs stage 3)
    init_from: str = ""         # an export folder, a checkpoint folder, or a Hugging Face Llama folder (its
    #                             shape and weights; docs/huggingface.md) to start the weights from
    freeze_text_steps: int = 0  # with init_from: the first N optimizer steps train only the new (non-text)
    #                             rows of embedding and head, every other weight bitwise fixed (mmfm/train/freeze.py)
    plot: bool = True           # loss-curve PNG at the end


@dataclass
class FinetuneSection:
    method: str = "lora"          # full or lora
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    freeze: str = "none"          # none, shared or modality_specific (full method)
    train_also: list[str] = field(default_factory=list)  # lora: name substrings kept trainable (e.g. embed_tokens)
    modality: str = ""            # the modality whose tokens get the loss (mmfm finetune sets it from --modality)
    source: str = ""              # the weights started from (mmfm finetune sets it from --from)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank


def finetune_checks(f: FinetuneSection) -> list[tuple[bool, str, str]]:
    return [(f.method in ("full", "lora"), "finetune.method", f"expected full or lora, got {f.method!r}"),
            (f.freeze in ("none", "shared", "modality_specific"), "finetune.freeze",
             f"expected none, shared or modality_specific, got {f.freeze!r}"),
            (f.lora_rank >= 1, "finetune.lora_rank", "must be >= 1"),
            (all(t in LORA_TARGETS for t in f.lora_targets), "finetune.lora_targets",
             f"each must be one of {', '.join(LORA_TARGETS)}, got {f.lora_targets}")]


def parse_finetune(raw, path: str) -> FinetuneSection:
    """A `finetune:` mapping -> FinetuneSection, errors naming the file and the field."""
    f = from_dict(FinetuneSection, raw or {}, f"{path}: finetune")
    for ok, name, why in finetune_checks(f):
        if not ok:
            raise ConfigError(f"{path}: {name}: {why}")
    return f


@dataclass
class RunConfig:
    model: ModelConfig
    deepspeed: dict
    data: DataSection
    objective: ObjectiveConfig
    optim: OptimSection
    train: TrainSection
    path: str = ""
    deepspeed_path: str = ""
    finetune: FinetuneSection | None = None   # present when the file has a finetune: section
    eval_prompts: PromptEvalSection = field(default_factory=PromptEvalSection)

    def to_dict(self) -> dict:
        d = {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "data", "objective", "optim", "train", "eval_prompts")}
        d["deepspeed"] = self.deepspeed
        d["finetune"] = dataclasses.asdict(self.finetune) if self.finetune is not None else {}
        return d


SECTIONS = ("model", "deepspeed", "data", "objective", "optim", "train", "finetune", "eval_prompts")
WHOLE = ("model", "deepspeed")   # sections an override may replace whole: model=FILE, deepspeed=FILE


def _parse_override(item: str, path: str):
    import yaml

    if "=" not in item or ("." not in item.split("=", 1)[0] and item.split("=", 1)[0] not in WHOLE):
        raise ConfigError(f"{path}: override {item!r}: expected section.field=value (e.g. train.steps=10), "
                          "model=FILE or deepspeed=FILE")
    key, value = item.split("=", 1)
    return key.split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str], path: str, sections: tuple = SECTIONS) -> dict:
    """section.field=value items (or model=FILE / deepspeed=FILE) applied to the raw YAML mapping;
    `sections`: the top-level fields this file type has."""
    for item in overrides or []:
        keys, value = _parse_override(item, path)
        if keys[0] not in sections:
            raise ConfigError(f"{path}: override {item!r}: unknown section {keys[0]!r}; expected {', '.join(sections)}")
        d = raw
        for k in keys[:-1]:
            if not isinstance(d.get(k), dict):
                d[k] = {} if d.get(k) is None else d[k]
                if not isinstance(d[k], dict):
                    raise ConfigError(f"{path}: override {item!r}: {k} is not a mapping")
            d = d[k]
        d[keys[-1]] = value
    return raw


def read_deepspeed(value, where: str) -> tuple[dict, str]:
    """A `deepspeed` field: a plain DeepSpeed JSON file path or an inline mapping -> (the config,
    the path or ""). `where` names the field in errors (e.g. "run.yaml: deepspeed")."""
    if isinstance(value, str):
        try:
            with open(value) as f:
                return json.load(f), value
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {value}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {value} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON file path or a mapping")
    return value, ""


def load_run_config(path, overrides: list[str] | None = None, model: ModelConfig | None = None) -> RunConfig:
    """model: when given (mmfm finetune: the source's), the file's model section is ignored and
    model overrides are refused."""
    import yaml

    path = str(path)
    raw = read_sections(path, SECTIONS, files=("model", "deepspeed"))   # resolved from the config's folder
    if model is not None:
        touched = [o for o in overrides or [] if o.split("=", 1)[0].split(".")[0] == "model"]
        if touched:
            raise ConfigError(f"{path}: override {touched[0]!r}: the model is given (for mmfm finetune, the "
                              "source's, --from); it cannot be overridden")
        raw.pop("model", None)
    whole = [o for o in overrides or [] if o.split("=", 1)[0] in WHOLE]
    raw = apply_overrides(raw, whole, path)          # model=FILE first, then model.field=... into it
    overrides = [o for o in overrides or [] if o not in whole]
    if isinstance(raw.get("model"), str) and any(o.startswith("model.") for o in overrides or []):
        try:  # a model override on a model file: read the file's mapping, then override into it
            with open(raw["model"]) as f:
                raw["model"] = (yaml.safe_load(f) or {}).get("model")
        except OSError as exc:
            raise ConfigError(f"{path}: model: cannot read {raw['model']}: {exc.strerror}") from None
    raw = apply_overrides(raw, overrides or [], path)
    m = raw.get("model")
    if model is None:
        if isinstance(m, str):
            model = load_model_config(m)
        elif isinstance(m, dict):
            model = model_config_from_dict(m, f"{path}: model")
        else:
            raise ConfigError(f"{path}: model: expected a model config path or mapping, got {m!r}")
    ds, ds_path = read_deepspeed(raw.get("deepspeed", packaged_config("deepspeed/zero0.json")), f"{path}: deepspeed")
    data = from_dict(DataSection, raw.get("data"), f"{path}: data")
    objective = objective_config_from_dict(raw.get("objective"), f"{path}: objective")
    optim = from_dict(OptimSection, raw.get("optim"), f"{path}: optim")
    train = from_dict(TrainSection, raw.get("train"), f"{path}: train")
    fin = parse_finetune(raw["finetune"], path) if raw.get("finetune") is not None else None
    prompts = from_dict(PromptEvalSection, raw.get("eval_prompts"), f"{path}: eval_prompts")
    if prompts.n < 0:
        raise ConfigError(f"{path}: eval_prompts.n: must be >= 0 (0 = off), got {prompts.n}")
    if prompts.cfg_scale < 0:
        raise ConfigError(f"{path}: eval_prompts.cfg_scale: must be >= 0 (1 = no guidance), got {prompts.cfg_scale}")
    for m, scale in prompts.cfg_by_modality.items():
        if m not in GUIDED_MODALITIES:
            raise ConfigError(f"{path}: eval_prompts.cfg_by_modality: unknown modality {m!r}; expected one of "
                              f"{', '.join(GUIDED_MODALITIES)}")
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ConfigError(f"{path}: eval_prompts.cfg_by_modality.{m}: must be a number >= 0 (1 = no guidance), "
                              f"got {scale!r}")
    for name in ("corpus", "tokenizers"):
        if prompts.n and not getattr(prompts, name):
            raise ConfigError(f"{path}: eval_prompts.{name}: required when eval_prompts.n > 0 "
                              f"({'the demo corpus folder' if name == 'corpus' else 'the trained tokenizers folder'})")
    cfg = RunConfig(model, ds, data, objective, optim, train, path, ds_path, fin, prompts)
    validate(cfg)
    return cfg


PRECISIONS = ("fp32", "bf16", "bf16_autocast")


def switch_checks(t: TrainSection, deepspeed: dict) -> list[tuple[bool, str, str]]:
    """The memory and speed switches of a train section against the DeepSpeed JSON."""
    from mmfm.models.transformer import CHECKPOINTING

    zero = deepspeed.get("zero_optimization", {}) if isinstance(deepspeed, dict) else {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return [
        (t.activation_checkpointing in CHECKPOINTING, "train.activation_checkpointing",
         f"expected one of {', '.join(CHECKPOINTING)}, got {t.activation_checkpointing!r}"),
        (bool(t.compile_backend), "train.compile_backend", "expected a torch.compile backend name (e.g. inductor)"),
        (math.isfinite(t.peak_flops) and t.peak_flops >= 0, "train.peak_flops",
         f"expected the peak FLOP/s of one process, >= 0 (0 = measure a matmul at start), got {t.peak_flops!r}"),
        (not t.offload_params or stage == 3, "train.offload_params",
         f"parameter offload needs ZeRO stage 3, the deepspeed config has stage {stage} (use deepspeed/zero3.json)"),
    ]


def validate(cfg: RunConfig) -> None:
    p = cfg.path
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (t.precision in PRECISIONS, "train.precision", f"expected {', '.join(PRECISIONS)}, got {t.precision!r}"),
        (t.steps >= 1, "train.steps", "must be >= 1"),
        (t.micro_batch >= 1, "train.micro_batch", "must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (t.keep_last >= 1, "train.keep_last", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1"),
        (o.lr > 0, "optim.lr", "must be > 0"),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
        (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (d.seq_len >= 2, "data.seq_len", "must be >= 2"),
        (d.seq_len <= cfg.model.max_seq_len, "data.seq_len", f"exceeds the model's max_seq_len {cfg.model.max_seq_len}"),
        (d.pack in ("concat", "whole"), "data.pack", f"expected concat or whole, got {d.pack!r}"),
        (0.0 <= d.caption_dropout < 1.0, "data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}"),
        (all(w > 0 for w in d.mix.values()), "data.mix", f"weights must be > 0, got {d.mix}"),
        (not (d.sources and d.shards), "data.sources",
         f"give data.shards or data.sources, not both (shards is {d.shards!r})"),
        (all(w > 0 for w in d.source_weights.values()), "data.source_weights", f"weights must be > 0, got {d.source_weights}"),
        (set(d.source_weights) <= set(d.sources), "data.source_weights",
         f"names {sorted(set(d.source_weights) - set(d.sources))} are not in data.sources ({sorted(d.sources)})"),
    ]
    checks += switch_checks(t, cfg.deepspeed)
    if t.freeze_text_steps:
        zero = cfg.deepspeed.get("zero_optimization", {}) if isinstance(cfg.deepspeed, dict) else {}
        zero = zero if isinstance(zero, dict) else {}
        off = zero.get("offload_optimizer") or {}
        checks += [
            (t.freeze_text_steps >= 0, "train.freeze_text_steps",
             f"must be >= 0 (0 = off), got {t.freeze_text_steps}"),
            (bool(t.init_from), "train.freeze_text_steps",
             f"{t.freeze_text_steps} needs train.init_from (the text weights to hold fixed); a run from random "
             "weights has nothing to freeze"),
            (cfg.finetune is None, "train.freeze_text_steps", "is for pretraining from an LLM; mmfm finetune has "
             "finetune.freeze"),
            (zero.get("stage", 0) in (0, 1, 2), "train.freeze_text_steps",
             f"supported under ZeRO stages 0-2, the deepspeed config has stage {zero.get('stage')}"),
            (not t.offload_optimizer and not (isinstance(off, dict) and off.get("device", "none") != "none"),
             "train.freeze_text_steps", "not supported with an offloaded optimizer (untested with DeepSpeedCPUAdam)"),
        ]
    if cfg.finetune is not None:
        checks += finetune_checks(cfg.finetune)
    for ok, name, why in checks:
        if not ok:
            raise ConfigError(f"{p}: {name}: {why}")
    zero = cfg.deepspeed.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{p}: deepspeed ({cfg.deepspeed_path or 'inline'}): zero_optimization.stage must be 0, 1, 2 or 3")


def resolve_vocab_size(cfg: RunConfig, vocab) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab.size
    elif cfg.model.vocab_size < vocab.size:
        raise ConfigError(f"{cfg.path}: model.vocab_size: {cfg.model.vocab_size} is smaller than the vocabulary ({vocab.size})")
    if cfg.model.modality_sparse and cfg.model.num_modalities == 0:
        cfg.model.num_modalities = len(vocab.modality_names)


def output_dir(cfg: RunConfig) -> str:
    return os.path.abspath(cfg.train.out)
