"""The unified token space: one id range per modality, and the special tokens.

Layout (ids, in order):

    [0, text_size)                          the text tokenizer's own ids, unchanged
    one contiguous range per other modality  in the order given (e.g. image, audio, ...)
    special tokens                           <pad> <bos> <eos> <mask>, then <begin_M> <end_M>
                                             for every modality M (text included)

Text comes first so that a text-only model's ids are the text tokenizer's ids. Special tokens
come last so that adding a modality or a marker never shifts a tokenizer's range.

A multimodal sample is an ordered list of segments (modality, local token ids), e.g.
[("text", caption_ids), ("image", image_ids)]. `encode_sample` turns it into

    <bos> <begin_text> caption... <end_text> <begin_image> image... <end_image> <eos>

with the image ids shifted into the image range, plus a parallel sequence of modality ids
(`modality_index`: 0 for <pad>/<bos>/<eos>/<mask>, i + 1 for modality i, markers included) that
the model uses for modality-aware sparsity and per-modality losses. `decode_sample` inverts it.
`modality_table()` is the same map for every id at once, the one table that training, the decode
loop, speculative and masked decoding index with the token ids.
The vocabulary is saved as JSON beside the tokenizers, so an exported model carries it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from mmfm.jsonio import write_json

FORMAT_VERSION = 1
BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")
SPECIAL_MODALITY = "special"


@dataclass(frozen=True)
class ModalityRange:
    """Ids [start, stop) of one modality: global id = start + local id."""
    name: str
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


class Vocab:
    """Args:
        text_size: the text tokenizer's vocab size (>= 1); text owns ids [0, text_size).
        modalities: {name: size} for every other modality, in range order (dict order kept).
    """

    def __init__(self, text_size: int, modalities: dict[str, int] | None = None):
        ranges = [("text", text_size)] + list((modalities or {}).items())
        self.ranges: dict[str, ModalityRange] = {}
        start = 0
        for name, size in ranges:
            if not isinstance(name, str) or not name or "<" in name or ">" in name:
                raise ValueError(f"Vocab: modality name {name!r} must be a non-empty string without '<' or '>'")
            if name in self.ranges or name == SPECIAL_MODALITY:
                raise ValueError(f"Vocab: modality {name!r} given twice (or reserved)")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"Vocab: size of modality {name!r} must be an integer >= 1, got {size!r}")
            self.ranges[name] = ModalityRange(name, start, size)
            start += size
        self.special_start = start
        names = list(BASE_SPECIALS)
        for m in self.ranges:
            names += [f"<begin_{m}>", f"<end_{m}>"]
        self.special_tokens: dict[str, int] = {n: start + i for i, n in enumerate(names)}
        self._special_names = {i: n for n, i in self.special_tokens.items()}
        self.size = start + len(names)
        # modality index: 0 = special, i + 1 = i-th modality
        self.modality_names = [SPECIAL_MODALITY] + list(self.ranges)
        self._modality_tables: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return self.size

    @property
    def pad_id(self) -> int:
        return self.special_tokens["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<eos>"]

    @property
    def mask_id(self) -> int:
        return self.special_tokens["<mask>"]

    def begin_id(self, modality: str) -> int:
        return self.special_tokens[f"<begin_{self._range(modality).name}>"]

    def end_id(self, modality: str) -> int:
        return self.special_tokens[f"<end_{self._range(modality).name}>"]

    def modality_index(self, modality: str) -> int:
        self._range(modality)
        return self.modality_names.index(modality)

    def _range(self, modality: str) -> ModalityRange:
        if modality not in self.ranges:
            raise ValueError(f"Vocab: unknown modality {modality!r}; known: {list(self.ranges)}")
        return self.ranges[modality]

    def check_ids(self, ids, name: str = "ids") -> torch.Tensor:
        """ids as an int64 tensor; every id must be in [0, size)."""
        t = torch.as_tensor(ids)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"Vocab: argument '{name}' must hold integers, got {t.dtype}")
        t = t.long()
        if t.numel():
            bad = (t < 0) | (t >= self.size)
            if bool(bad.any()):
                first = int(t[bad].reshape(-1)[0])
                raise ValueError(f"Vocab: id {first} in '{name}' is out of range [0, {self.size})")
        return t

    # ------------------------------------------------------------------ local <-> global
    def to_global(self, modality: str, local) -> torch.Tensor:
        """A tokenizer's ids -> unified ids; each local id must be in [0, size of the modality)."""
        r = self._range(modality)
        t = torch.as_tensor(local)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"Vocab.to_global: tokens of modality {modality!r} must be integers, got {t.dtype}")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= r.size):
            bad = int(t[(t < 0) | (t >= r.size)].reshape(-1)[0])
            raise ValueError(f"Vocab.to_global: token {bad} of modality {modality!r} is out of its range "
                             f"[0, {r.size})")
        return t + r.start

    def to_local(self, modality: str, ids) -> torch.Tensor:
        """Unified ids -> the modality's tokenizer ids; each id must lie in the modality's range."""
        r = self._range(modality)
        t = self.check_ids(ids)
        if t.numel() and (int(t.min()) < r.start or int(t.max()) >= r.stop):
            bad = int(t[(t < r.start) | (t >= r.stop)].reshape(-1)[0])
            raise ValueError(f"Vocab.to_local: id {bad} is not in the range of modality {modality!r} "
                             f"[{r.start}, {r.stop})")
        return t - r.start

    def modality_of(self, token_id: int) -> str:
        """Name of the modality whose range holds token_id, or 'special'."""
        i = int(self.check_ids(torch.tensor([token_id]))[0])
        if i >= self.special_start:
            return SPECIAL_MODALITY
        for r in self.ranges.values():
            if r.start <= i < r.stop:
                return r.name
        raise AssertionError("unreachable: ranges cover [0, special_start)")

    def modality_table(self, device=None) -> torch.Tensor:
        """int64 [size]: the modality index of every id (0 for <pad> <bos> <eos> <mask>, i + 1 for the
        i-th modality's range and its <begin_M> <end_M> markers), so `table[ids]` is what
        encode_sample returns as modality ids. One tensor per device, built on first use and shared
        by every caller: treat it as read-only."""
        device = torch.device("cpu" if device is None else device)
        table = self._modality_tables.get(device)
        if table is None:
            table = torch.zeros(self.size, dtype=torch.long)
            for name, r in self.ranges.items():
                i = self.modality_index(name)
                table[r.start:r.stop] = i
                table[[self.begin_id(name), self.end_id(name)]] = i
            table = self._modality_tables[device] = table.to(device)
        return table

    # ------------------------------------------------------------------ samples
    def encode_sample(self, segments, add_bos_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """segments: [(modality, local ids), ...] (or a dict, in its order) -> (ids, modality_ids), 1-D int64."""
        if isinstance(segments, dict):
            segments = list(segments.items())
        ids, mods = [], []
        if add_bos_eos:
            ids.append(torch.tensor([self.bos_id]))
            mods.append(torch.tensor([0]))
        for i, seg in enumerate(segments):
            if not isinstance(seg, (tuple, list)) or len(seg) != 2:
                raise ValueError(f"Vocab.encode_sample: segment {i} must be (modality, tokens)")
            modality, local = seg
            body = self.to_global(modality, torch.as_tensor(local).reshape(-1))
            piece = torch.cat([torch.tensor([self.begin_id(modality)]), body, torch.tensor([self.end_id(modality)])])
            ids.append(piece)
            mods.append(torch.full((piece.numel(),), self.modality_index(modality), dtype=torch.long))
        if add_bos_eos:
            ids.append(torch.tensor([self.eos_id]))
            mods.append(torch.tensor([0]))
        if not ids:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(ids).long(), torch.cat(mods).long()

    def decode_sample(self, ids) -> list[tuple[str, torch.Tensor]]:
        """Inverse of encode_sample: [(modality, local ids), ...]. <bos>, <eos> and <pad> are skipped;
        a segment must be closed by its own end marker; ids inside a segment must be in its range."""
        t = self.check_ids(ids).reshape(-1).tolist()
        skip = {self.bos_id, self.eos_id, self.pad_id}
        segments, current, body = [], None, []
        for pos, i in enumerate(t):
            name = self._special_names.get(i)
            if current is None:
                if i in skip:
                    continue
                if name and name.startswith("<begin_"):
                    current, body = name[len("<begin_"):-1], []
                    continue
                raise ValueError(f"Vocab.decode_sample: id {i} ({name or self.modality_of(i)}) at position {pos} "
                                 "is outside any <begin_M> ... <end_M> segment")
            if name == f"<end_{current}>":
                segments.append((current, self.to_local(current, torch.tensor(body, dtype=torch.long))))
                current = None
                continue
            r = self.ranges[current]
            if not r.start <= i < r.stop:
                raise ValueError(f"Vocab.decode_sample: id {i} at position {pos} is inside a {current!r} segment but "
                                 f"outside its range [{r.start}, {r.stop})")
            body.append(i)
        if current is not None:
            raise ValueError(f"Vocab.decode_sample: the {current!r} segment is not closed by <end_{current}>")
        return segments

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "size": self.size,
                "ranges": [{"modality": r.name, "start": r.start, "size": r.size} for r in self.ranges.values()],
                "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, d: dict, source: str = "vocab") -> "Vocab":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: 'format_version' is {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        ranges = d.get("ranges")
        if not isinstance(ranges, list) or not ranges or ranges[0].get("modality") != "text":
            raise ValueError(f"{source}: 'ranges' must be a list starting with the text range")
        vocab = cls(ranges[0]["size"], {r["modality"]: r["size"] for r in ranges[1:]})
        if vocab.to_dict() != d:  # starts, specials and size are derived: a hand-edited file must agree
            raise ValueError(f"{source}: the stored starts, special tokens or size disagree with the ranges' sizes")
        return vocab

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Vocab":
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.name}=[{r.start},{r.stop})" for r in self.ranges.values())
        return f"Vocab(size={self.size}, {parts}, specials=[{self.special_start},{self.size}))"
