"""The tokenizer interface, and saving / loading as safetensors + YAML (no pickle).

Every tokenizer:
    encode(sample) -> LongTensor [tokens_per_sample]   one sample (a decoded shard sample dict,
                                                        or the model-ready tensor from `prepare`)
    encode_batch(samples) -> LongTensor [B, N]
    decode(tokens) -> the sample (a str for text, a float tensor for the others)
    vocab_size, tokens_per_sample (fixed) or tokens_rule (a sentence saying how length varies)
    save(dir) / load_tokenizer(dir)

A saved tokenizer is a folder: `tokenizer.yaml` (registry name, format version, the model
config) and `weights.safetensors` (neural tokenizers) or `spm.model` (sentencepiece's protobuf).

NeuralTokenizer is the base of the learned ones (image, audio, video, 3D, physics). Its subclasses
define `prepare` (one decoded shard sample -> model input tensor, checking it and naming what is
wrong), `forward` (a training step's reconstruction, loss and metrics on a batch),
`encode_tensor` / `decode_tensor` (batched), and `metrics` (the reconstruction figures eval
reports).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field

import torch
from torch import nn

FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer.yaml"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class StepOutput:
    """What a training forward returns: reconstruction of the batch, scalar loss, detached metrics."""
    recon: torch.Tensor
    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)


def write_config(directory: str, name: str, config) -> None:
    import yaml

    os.makedirs(directory, exist_ok=True)
    doc = {"tokenizer": name, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(config)}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str):
    """(name, config dataclass) of a saved tokenizer folder."""
    import yaml

    from mmfm.tokenizers.registry import TOKENIZERS
    from mmfm.typed_config import ConfigError, from_dict

    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_tokenizer: {path} does not exist (is '{directory}' a saved tokenizer?)")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version is {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    name = doc.get("tokenizer")
    cls = TOKENIZERS.get(name, where=f"{path}: ").config_cls
    return name, from_dict(cls, doc.get("model"), f"{path}: model")


def load_tokenizer(directory: str, device: str = "cpu"):
    """Rebuild any saved tokenizer from its folder."""
    from mmfm.tokenizers.registry import tokenizer_class

    name, config = read_config(directory)
    return tokenizer_class(name).load_from(directory, config, device=device)


def tokenizer_folders(root: str, modalities) -> dict[str, str]:
    """{modality: folder holding tokenizer.yaml} under `root`, laid out either as an export's
    tokenizers/<m>/ or as `mmfm demo`'s tokenizers/<m>/tokenizer/; modalities with neither are left out."""
    out = {}
    for m in modalities:
        for folder in (os.path.join(root, m), os.path.join(root, m, "tokenizer")):
            if os.path.exists(os.path.join(folder, CONFIG_FILE)):
                out[m] = folder
                break
    return out


def seeded_init(init):
    """Decorator for a tokenizer's `__init__(self, config, ...)`: the constructor draws its initial
    weights from `config.seed`, and the caller's random state is left as it was.

    nn layers initialise from torch's global CPU generator; reseeding that generator inside a
    constructor would silently change every later random draw of the program that built the
    tokenizer. Only the CPU generator is forked: tokenizers are built on the CPU and moved after,
    and touching the CUDA generators here would initialise CUDA."""
    @functools.wraps(init)
    def wrapped(self, config, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)
            init(self, config, *args, **kwargs)
    return wrapped


class NeuralTokenizer(nn.Module):
    """Base of the learned tokenizers. Subclasses set `modality` and implement the methods below."""

    modality = ""
    registry_name = ""   # set by @register
    config_cls = None    # set by @register

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.frozen: tuple[str, ...] = ()

    # -- to implement ---------------------------------------------------------------------
    def prepare(self, sample) -> torch.Tensor:
        """One decoded shard sample (dict) or tensor -> the model input for one sample, checked."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Batched model inputs -> tokens [B, tokens_per_sample]."""
        raise NotImplementedError

    def decode_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def tokens_per_sample(self) -> int:
        raise NotImplementedError

    def metrics(self, x: torch.Tensor, recon: torch.Tensor) -> dict:
        """Reconstruction figures (floats) of a batch, as eval reports them."""
        raise NotImplementedError

    # -- optional hooks, called by `mmfm tokenizer train` -----------------------------------
    def fit_data(self, train: torch.Tensor) -> None:
        """Before training: fit data statistics (e.g. normalisation) on the prepared training set."""

    def after_training(self, train: torch.Tensor) -> None:
        """After training: fit anything post hoc (e.g. TokenBridge's bins) on the training set."""

    def preview(self, x: torch.Tensor, recon: torch.Tensor) -> list:
        """[(input image, reconstruction image)] pairs, [C, H, W] in [0, 1], for the side-by-side PNG."""
        return []

    # -- shared ---------------------------------------------------------------------------
    def freeze(self, names, where: str = "train.freeze") -> None:
        """Leave the named parts (direct submodules: encoder, quantizer, decoder, ...) as they are in
        training: no gradient, and eval mode through every later train() call, so a quantizer's
        training-time updates (codebook EMA, dead-code revival) do not run either."""
        parts = {n for n, m in self.named_children() if any(True for _ in m.parameters()) or
                 any(True for _ in m.buffers())}
        for n in names:
            if n not in parts:
                raise ValueError(f"{where}: {n!r} is not a part of the {self.registry_name or type(self).__name__} "
                                 f"tokenizer; its parts are {sorted(parts)}")
        for n in names:
            getattr(self, n).requires_grad_(False)
        self.frozen = tuple(names)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"{where}: freezing {list(names)} leaves nothing to train")
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for n in getattr(self, "frozen", ()):
            getattr(self, n).eval()
        return self

    def load_init(self, directory: str, where: str = "train.init") -> None:
        """Start from a saved tokenizer's weights (its folder), refusing another kind or shape."""
        from safetensors.torch import load_file

        if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
            raise ValueError(f"{where}: '{directory}' is not a saved tokenizer folder (no {CONFIG_FILE}); "
                             "expected e.g. runs/tokenizers/<name>/tokenizer")
        name, _ = read_config(directory)
        if name != self.registry_name:
            raise ValueError(f"{where}: '{directory}' holds a {name!r} tokenizer; this config trains "
                             f"{self.registry_name!r}")
        state = load_file(os.path.join(directory, WEIGHTS_FILE), device=str(self.device))
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        extra = sorted(set(state) - set(mine))
        shape = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
        if missing or extra or shape:
            raise ValueError(f"{where}: the weights in '{directory}' do not fit this config's model fields "
                             f"(missing {missing[:4]}, unexpected {extra[:4]}, other shapes {shape[:4]})")
        self.load_state_dict(state, strict=True)

    @property
    def bits_per_sample(self) -> float:
        import math

        return self.tokens_per_sample * math.log2(self.vocab_size)

    def _as_batch(self, sample) -> torch.Tensor:
        x = self.prepare(sample)
        return x.unsqueeze(0).to(self.device)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(self, sample) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return self.encode_tensor(self._as_batch(sample))[0]
        finally:
            self.train(was)

    @torch.no_grad()
    def encode_batch(self, samples) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            x = torch.stack([self.prepare(s) for s in samples])  # a batch tensor iterates as its samples
            return self.encode_tensor(x.to(self.device))
        finally:
            self.train(was)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens of one sample [N] (or a batch [B, N]) -> the sample (or the batch)."""
        was = self.training
        self.eval()
        try:
            tokens = self.check_tokens(tokens)
            single = tokens.dim() == 1
            out = self.decode_tensor(tokens.unsqueeze(0) if single else tokens)
            return out[0] if single else out
        finally:
            self.train(was)

    def check_tokens(self, tokens) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() not in (1, 2):
            raise ValueError(f"{name}.decode: argument 'tokens' must be an int64 tensor [N] or [B, N]")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"{name}.decode: every token must be in [0, {self.vocab_size}) (vocab_size)")
        return tokens.to(self.device)

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        tmp = os.path.join(directory, WEIGHTS_FILE + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt", "mmfm.tokenizer": self.registry_name})
        os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))
        write_config(directory, self.registry_name, self.config)

    @classmethod
    def load_from(cls, directory: str, config, device: str = "cpu"):
        from safetensors.torch import load_file

        module = cls(config)
        module.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE), device=str(device)), strict=True)
        return module.to(device).eval()

    @classmethod
    def load(cls, directory: str, device: str = "cpu"):
        name, config = read_config(directory)
        if name != cls.registry_name:
            raise ValueError(f"{cls.__name__}.load: '{directory}' holds a {name!r} tokenizer")
        return cls.load_from(directory, config, device=device)


def check_finite(x: torch.Tensor, owner: str, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{owner}: {what} contains NaN or infinite values")
