"""The export's Hugging Face tokenizer: `tokenizer.json` built with the `tokenizers` library from the
text tokenizer's sentencepiece model, at the unified vocabulary's ids. (A model started from an
existing LLM has that LLM's tokenizer.json as its text tokenizer, mmfm/tokenizers/hf_text.py: it is
taken as it is, its own post-processor replaced, and the non-text tokens added after it.)

    ids [0, text_size)       the sentencepiece pieces, at their own ids (the unified vocabulary keeps
                             text first, mmfm/vocab.py), so a text id means the same in both
    ids [text_size, size)    one added special token per non-text id, named so a person can read a
                             decoded sequence: <|image_00123|> (local id 123 of the image range),
                             <|bos|> <|eos|> <|pad|> <|mask|>, <|begin_image|> <|end_image|>, ...

Every non-text name is wrapped in <|...|> (not the vocabulary's own <pad>, <bos>): sentencepiece
already owns a piece called <pad>, and one spelling for all of them is easier to grep for.

The encoder follows the sentencepiece model's own settings, so `AutoTokenizer` gives the ids
`SentencePieceProcessor.encode` gives: the precompiled NFKC map, sentencepiece's removal of extra
spaces (leading, trailing and runs; other whitespace is kept), the dummy prefix "▁", BPE merges
ranked by the merged piece's score (sentencepiece merges the best-scoring pair first), byte fallback
(<0xNN> pieces) and user-defined pieces kept whole. Digit splitting needs no rule here: a model trained
with split_digits has no piece holding two digits or a digit and another character, so no merge can
join them. Unigram models get tokenizers' Unigram model over the same pieces and scores.

Two known differences, both from tokenizers' building blocks, both outside what a trained model's
text normally holds: (1) tokenizers' Precompiled normalizer looks a whole grapheme up by its shortest
mapped prefix, so a combining mark right after a character NFKC rewrites (ﬁ, Ａ, ǅ + U+0301) is
dropped, where sentencepiece keeps it (space-like characters are pre-mapped, see _mapped_to_space,
so a mark after U+3000 or a tab is kept); (2) decoding an invalid UTF-8 run of <0xNN> byte pieces
gives one U+FFFD per byte (tokenizers' ByteFallback), sentencepiece one per invalid sequence. The
ids of generated text are the same either way; only (2)'s string differs.

The text that special tokens cut into chunks gets a dummy prefix per chunk ("always"), like mmfm's
own text segments, each encoded by its own sentencepiece call. Encoding with special tokens adds
<|bos|> <|begin_text|> in front: that is how `mmfm generate --to text` lays out a prompt
(mmfm/generate/prompt.py), so `pipeline("text-generation")` hands the model the same ids.
"""
from __future__ import annotations

import os
import re

from mmfm.jsonio import write_json
from mmfm.vocab import BASE_SPECIALS, Vocab

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def special_name(vocab_name: str) -> str:
    """<bos> -> <|bos|>, <begin_image> -> <|begin_image|>."""
    return f"<|{vocab_name[1:-1]}|>"


def non_text_names(vocab: Vocab) -> list[str]:
    """The token name of every id in [text_size, size), in id order."""
    names = []
    for r in list(vocab.ranges.values())[1:]:
        width = max(5, len(str(r.size - 1)))
        names += [f"<|{r.name}_{i:0{width}d}|>" for i in range(r.size)]
    names += [special_name(n) for n, _ in sorted(vocab.special_tokens.items(), key=lambda kv: kv[1])]
    return names


def read_spm_proto(path: str):
    """A sentencepiece model file -> its ModelProto (pieces, trainer and normalizer specs)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if not proto.pieces:
        raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def _mapped_to_space(precompiled) -> list[int]:
    """The whitespace-like code points the charsmap maps to a space (nmt_nfkc: tab, newline, U+3000,
    zero-width spaces, ...). They are replaced before the charsmap runs because tokenizers' Precompiled
    looks a whole grapheme up by its shortest mapped prefix: U+3000 followed by a combining mark would
    become one space and lose the mark, where sentencepiece maps U+3000 and keeps the mark."""
    import unicodedata

    cands = [c for c in range(0x3400) if unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf")]
    cands += [0x2581, 0x3000, 0xFEFF, 0xFFFD]
    return [c for c in cands if c != 0x20 and precompiled.normalize_str(chr(c)) == " "]


def build_text_tokenizer(proto, source: str = "spm.model"):
    """The sentencepiece model as a `tokenizers.Tokenizer` (text ids only, no post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    pieces = [p.piece for p in proto.pieces]
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"{source}: the sentencepiece model holds a piece twice; a tokenizer.json vocabulary cannot")
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if ts.model_type == ts.BPE:
        normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
        ranked = []
        for piece, (score, i) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, i, left, right))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token=ts.unk_piece or None,
                    fuse_unk=True, byte_fallback=ts.byte_fallback, ignore_merges=bool(user_defined))
    elif ts.model_type == ts.UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    else:
        raise ValueError(f"{source}: sentencepiece model_type {ts.model_type} is not bpe or unigram; "
                         "only those two convert to tokenizer.json")
    tok = Tokenizer(model)
    norm = []
    if ns.precompiled_charsmap:
        precompiled = normalizers.Precompiled(ns.precompiled_charsmap)
        spaces = _mapped_to_space(precompiled)
        if spaces:
            norm.append(normalizers.Replace(Regex("[" + "".join(f"\\x{{{c:x}}}" for c in spaces) + "]"), " "))
        norm.append(precompiled)
    if ns.remove_extra_whitespaces:   # spaces only: sentencepiece keeps tabs and newlines
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    if ns.add_dummy_prefix:   # Metaspace adds no prefix to text already starting with ▁; sentencepiece does
        norm.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(norm)
    pre = []
    if ns.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
    if user_defined:   # sentencepiece emits them whole, never merged with a neighbour
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    return tok


def text_tokenizer_of(text_dir: str):
    """(tokenizers.Tokenizer of the text ids, their token names, the source file) from an mmfm text
    tokenizer folder: spm.model (sentencepiece, converted here) or tokenizer.json (an imported LLM's
    tokenizer, mmfm/tokenizers/hf_text.py, used as it is)."""
    from tokenizers import Tokenizer

    spm_path, json_path = os.path.join(text_dir, "spm.model"), os.path.join(text_dir, "tokenizer.json")
    if os.path.exists(spm_path):
        proto = read_spm_proto(spm_path)
        return build_text_tokenizer(proto, spm_path), [p.piece for p in proto.pieces], spm_path
    if os.path.exists(json_path):
        tok = Tokenizer.from_file(json_path)
        size = tok.get_vocab_size(with_added_tokens=True)
        names = [tok.id_to_token(i) for i in range(size)]
        if any(n is None for n in names):
            raise ValueError(f"{json_path}: ids [0, {size}) are not all taken; the unified vocabulary needs them dense")
        return tok, names, json_path
    raise FileNotFoundError(f"{text_dir}: no spm.model or tokenizer.json (a text tokenizer folder)")


def build_unified_tokenizer(text_dir: str, vocab: Vocab):
    """tokenizer.json's Tokenizer: the text tokens at [0, text_size), every other id an added special
    token, and <|bos|> <|begin_text|> in front when encoding with special tokens."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    tok, pieces, source = text_tokenizer_of(text_dir)
    text_size = vocab.ranges["text"].size
    if len(pieces) != text_size:
        raise ValueError(f"{source}: the text tokenizer has {len(pieces)} tokens but the vocabulary's text "
                         f"range has {text_size} ids (vocab.json ranges[0].size); export with the tokenizers the "
                         "run was trained with")
    names = non_text_names(vocab)
    taken = set(pieces).intersection(names)
    if taken:
        raise ValueError(f"{source}: the text tokenizer has a token named {sorted(taken)[0]!r}, the name of a "
                         "non-text token of the unified vocabulary")
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    got = [tok.token_to_id(n) for n in (names[0], names[-1])]
    if got != [text_size, vocab.size - 1]:
        raise AssertionError(f"added tokens landed at {got}, expected [{text_size}, {vocab.size - 1}]")
    bos, begin = special_name("<bos>"), special_name("<begin_text>")
    tok.post_processor = TemplateProcessing(
        single=f"{bos} {begin} $A", pair=f"{bos} {begin} $A $B:1",
        special_tokens=[(bos, vocab.bos_id), (begin, vocab.begin_id("text"))])
    return tok


def special_tokens_map(vocab: Vocab) -> dict:
    base = {f"{n[1:-1]}_token": special_name(n) for n in BASE_SPECIALS}
    markers = [special_name(n) for n in vocab.special_tokens if n not in BASE_SPECIALS]
    return {**base, "additional_special_tokens": markers}


def write_tokenizer_files(out: str, text_dir: str, vocab: Vocab, model_max_length: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out` from the text
    tokenizer folder `text_dir`; their names."""
    tok = build_unified_tokenizer(text_dir, vocab)
    tok.save(os.path.join(out, "tokenizer.json"))
    smap = special_tokens_map(vocab)
    write_json(os.path.join(out, "special_tokens_map.json"), smap)
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **smap,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        "padding_side": "left",   # decoder-only: batched generation pads on the left
    })
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
