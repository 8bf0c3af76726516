"""`mmfm export RUN_OR_CHECKPOINT --out DIR` and `mmfm.load(DIR)`.

Input: a pretrain output folder (<out>, holding config.json and checkpoints/latest) or its
checkpoints/ folder. The newest complete checkpoint is consolidated to fp32: ZeRO 1-3 through
DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (which also gathers ZeRO-3 shards), stage 0
from the model-states file. Output folder:

    model.safetensors        (model-0000i-of-0000n.safetensors + model.safetensors.index.json above
                              --shard-mb, split by huggingface_hub's split_torch_state_dict_into_shards);
                              Llama names (model.layers.0.self_attn.q_proj.weight, ...)
    config.json              transformers LlamaConfig (dense models) + "mmfm" block with the ModelConfig
    mmfm_model.json          the ModelConfig
    vocab.json               the unified vocabulary
    generation_config.json   bos / eos (<eos>, <end_text>) / pad, non-text ids suppressed (with a vocab)
    tokenizers/              copied from --tokenizers DIR when given
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                             when tokenizers/text/ is there: the text tokenizer at the unified ids plus
                             every non-text id as a named special token (hf_tokenizer.py)
    README.md                the model card (card.py): shape, vocabulary, loading, training config,
                             data, held-out figures from the run's records

A dense model loads in transformers with AutoModelForCausalLM / AutoTokenizer / pipeline
("text-generation") from DIR, and so in lm-evaluation-harness (`mmfm eval lm`). A modality-sparse
model's per-modality weights are stored under mmfm's own names; with a vocabulary the folder also
gets configuration_mmfm.py / modeling_mmfm.py (remote/) and an auto_map in config.json, so
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads it too.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

from mmfm.models import ModelConfig
from mmfm.models.hf import hf_config_dict, to_hf
from mmfm.models.io import load, read_state  # noqa: F401  (mmfm.export.load stays importable)
from mmfm.jsonio import write_json
from mmfm.train.checkpoint import consolidate, run_dir_of

INDEX_FILE = "model.safetensors.index.json"
REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_mmfm.py", "modeling_mmfm.py")


def write_weights(tensors: dict, out: str, shard_mb: float) -> list[str]:
    """Safetensors files (+ model.safetensors.index.json when there is more than one), split by
    huggingface_hub's helper, the same split transformers' save_pretrained makes. Weight files of an
    earlier export into the same folder are removed first: readers load every *.safetensors there."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    for f in os.listdir(out):
        if f.endswith(".safetensors") or f == INDEX_FILE:
            os.remove(os.path.join(out, f))
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max(1, int(shard_mb * 2 ** 20)))
    for name, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(out, name), metadata={"format": "pt"})
    names = sorted(split.filename_to_tensors)
    if split.is_sharded:
        write_json(os.path.join(out, INDEX_FILE), {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
        names.append(INDEX_FILE)
    return names


def generation_config(vocab) -> dict:
    """generation_config.json: what `mmfm generate --to text` does, for transformers' generate. Text
    stops at <eos> or <end_text>; every id a text row may not emit (the other modalities' ranges and
    markers) is suppressed, as mmfm's constraint masks them (mmfm/generate/constraints.py), so greedy
    output is the same token for token."""
    r = vocab.ranges["text"]
    stop = [vocab.eos_id, vocab.end_id("text")]
    suppress = [i for i in range(vocab.size) if not r.start <= i < r.stop and i not in stop]
    return {"bos_token_id": vocab.bos_id, "eos_token_id": stop, "pad_token_id": vocab.pad_id,
            "suppress_tokens": suppress, "do_sample": False}


def modality_runs(vocab) -> list[list[int]]:
    """The vocabulary's modality table (the weight group of every id) as [[start, stop, group], ...]."""
    table = vocab.modality_table().tolist()
    runs = []
    for i, g in enumerate(table):
        if runs and runs[-1][2] == g and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, g])
    return runs


def remote_config_dict(cfg: ModelConfig, vocab) -> dict:
    """config.json of a modality-sparse export: remote/configuration_mmfm.py's MmfmConfig, with
    auto_map so AutoConfig / AutoModelForCausalLM (trust_remote_code=True) find the files."""
    if vocab.size != cfg.vocab_size:
        raise ValueError(f"vocab.json: size {vocab.size} differs from the model's vocab_size {cfg.vocab_size}")
    table_max = int(vocab.modality_table().max())
    if table_max >= cfg.groups:
        raise ValueError(f"model.num_modalities: the model has {cfg.groups} weight groups but the vocabulary has "
                         f"modality index {table_max}")
    return {
        "architectures": ["MmfmForCausalLM"], "model_type": "mmfm_mot",
        "auto_map": {"AutoConfig": "configuration_mmfm.MmfmConfig",
                     "AutoModelForCausalLM": "modeling_mmfm.MmfmForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "num_groups": cfg.groups, "modality_runs": modality_runs(vocab), "torch_dtype": "float32",
        "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
    }


def write_folder(state: dict, cfg: ModelConfig, out: str, vocab_path: str | None = None,
                 tokenizers: str | None = None, shard_mb: float = 2000.0, run_dir: str | None = None,
                 run_cfg: dict | None = None) -> str:
    """The export folder (see the module docstring) from an mmfm state dict. run_dir / run_cfg, when
    given, feed the model card (training config, data, held-out losses)."""
    from mmfm.export.card import model_card

    tok_folders = export_tokenizers(tokenizers) if tokenizers else {}   # checked before anything is written

    os.makedirs(out, exist_ok=True)
    dense = cfg.groups == 1
    tensors = to_hf(state, cfg) if dense else dict(state)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    write_weights(tensors, out, shard_mb)
    mcfg = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    ids, vocab = {}, None
    if vocab_path:
        from mmfm.vocab import Vocab

        vocab = Vocab.load(vocab_path)
        vocab.save(os.path.join(out, "vocab.json"))
        ids = dict(bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    if dense:
        config = hf_config_dict(cfg, **ids)
    elif vocab is not None:   # transformers loads it through the modeling file written beside it
        config = remote_config_dict(cfg, vocab)
        for name in REMOTE_FILES:
            shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(out, name))
    else:   # no vocabulary, no id -> weight-group map: mmfm.load only
        config = {"architectures": ["MmfmModalitySparse"]}
    config["mmfm"] = {"model": mcfg, "layout": "llama" if dense else "mmfm"}
    write_json(os.path.join(out, "config.json"), config)
    write_json(os.path.join(out, "mmfm_model.json"), mcfg)
    for m, folder in tok_folders.items():
        shutil.copytree(folder, os.path.join(out, "tokenizers", m), dirs_exist_ok=True)
    text_dir = os.path.join(out, "tokenizers", "text")
    if vocab is not None:
        write_json(os.path.join(out, "generation_config.json"), generation_config(vocab))
        if any(os.path.exists(os.path.join(text_dir, f)) for f in ("spm.model", "tokenizer.json")):
            from mmfm.export.hf_tokenizer import write_tokenizer_files

            write_tokenizer_files(out, text_dir, vocab, cfg.max_seq_len)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, vocab, run_cfg, run_dir, has_tokenizer=os.path.exists(os.path.join(out, "tokenizer.json"))))
    return out


def export_tokenizers(tokenizers: str) -> dict[str, str]:
    """{modality: saved tokenizer folder} of a --tokenizers folder, laid out as an export's
    tokenizers/<m>/ or as `mmfm demo`'s tokenizers/<m>/tokenizer/ (a training run's folder, whose
    checkpoints and logs are not copied). A modality folder with neither is an error naming it:
    copied as it is, it would load nowhere. (The layouts are those of
    mmfm.tokenizers.base.tokenizer_folders, which export may not import: docs/architecture.md.)"""
    if not os.path.isdir(tokenizers):
        raise FileNotFoundError(f"--tokenizers: {tokenizers} is not a folder")
    subdirs = sorted(m for m in os.listdir(tokenizers)
                     if not m.startswith(".") and os.path.isdir(os.path.join(tokenizers, m)))
    found = {}
    for m in subdirs:
        for folder in (os.path.join(tokenizers, m), os.path.join(tokenizers, m, "tokenizer")):
            if os.path.isfile(os.path.join(folder, "tokenizer.yaml")):
                found[m] = folder
                break
    bad = [os.path.join(tokenizers, m) for m in subdirs if m not in found]
    if bad or not found:
        raise ValueError(f"--tokenizers: expected <modality>/tokenizer.yaml or <modality>/tokenizer/tokenizer.yaml "
                         f"in {tokenizers}; " + (f"neither in {', '.join(bad)}" if bad else "it has no modality folder"))
    return found


def export(run_dir: str, out: str, tokenizers: str | None = None, shard_mb: float = 2000.0) -> str:
    state, run_cfg = consolidate(run_dir)
    if any(k.endswith(".lora_A") for k in state):   # a LoRA fine-tune: merge into plain weights
        from mmfm.models.lora import merge_lora_state

        ft = run_cfg.get("finetune") or {}
        state = merge_lora_state(state, float(ft["lora_alpha"]) / int(ft["lora_rank"]))
    cfg = ModelConfig(**run_cfg["model"])
    return write_folder(state, cfg, out, run_cfg["data"].get("vocab") or None, tokenizers, shard_mb,
                        run_dir=run_dir_of(run_dir), run_cfg=run_cfg)


def cmd_export(args) -> int:
    try:
        out = export(args.run, args.out, args.tokenizers, args.shard_mb)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfm export: {exc}", file=sys.stderr)
        return 2
    hf_tok = os.path.exists(os.path.join(out, "tokenizer.json"))
    print(f"export: {out} (safetensors, config.json, vocab.json{', tokenizers' if args.tokenizers else ''}"
          f"{', tokenizer.json' if hf_tok else ''}, README.md)")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="consolidate a run's ZeRO checkpoint into safetensors + a Hugging Face folder")
    p.add_argument("run", help="pretrain output folder (or its checkpoints/ folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizers", default=None, help="folder of trained tokenizers to copy in")
    p.add_argument("--shard-mb", type=float, default=2000.0, help="safetensors shard size")
