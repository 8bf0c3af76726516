"""`mmfm export RUN_OR_CHECKPOINT --out DIR` and `mmfm.load(DIR)`.

Input: a pretrain output folder (<out>, holding config.json and checkpoints/latest) or its
checkpoints/ folder. The newest complete checkpoint is consolidated to fp32: ZeRO 1-3 through
DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (which also gathers ZeRO-3 shards), stage 0
from the model-states file. Output folder:

    model.safetensors        (model-0000i-of-0000n.safetensors + model.safetensors.index.json above
                              --shard-mb); Llama names (model.layers.0.self_attn.q_proj.weight, ...)
    config.json              transformers LlamaConfig (dense models) + "mmfm" block with the ModelConfig
    mmfm_model.json          the ModelConfig
    vocab.json               the unified vocabulary
    tokenizers/              copied from --tokenizers DIR when given

A dense model loads in transformers with LlamaForCausalLM.from_pretrained(DIR). A modality-sparse
model's per-modality weights are stored under mmfm's own names (config.json says so), and it loads
with mmfm.load(DIR) only.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from mmfm.models import ModelConfig
from mmfm.models.hf import hf_config_dict, to_hf
from mmfm.models.io import load, read_state  # noqa: F401  (mmfm.export.load stays importable)
from mmfm.train.checkpoint import consolidate


def write_folder(state: dict, cfg: ModelConfig, out: str, vocab_path: str | None = None,
                 tokenizers: str | None = None, shard_mb: float = 2000.0) -> str:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    dense = cfg.groups == 1
    tensors = to_hf(state, cfg) if dense else dict(state)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    limit = shard_mb * 2 ** 20
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {}}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, os.path.join(out, name), metadata={"format": "pt"})
            index["weight_map"].update({k: name for k in sh})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    mcfg = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    ids = {}
    if vocab_path:
        from mmfm.vocab import Vocab

        v = Vocab.load(vocab_path)
        v.save(os.path.join(out, "vocab.json"))
        ids = dict(bos_id=v.bos_id, eos_id=v.eos_id, pad_id=v.pad_id)
    config = hf_config_dict(cfg, **ids) if dense else {"architectures": ["MmfmModalitySparse"]}
    config["mmfm"] = {"model": mcfg, "layout": "llama" if dense else "mmfm"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out, "mmfm_model.json"), "w") as f:
        json.dump(mcfg, f, indent=1)
    if tokenizers:
        shutil.copytree(tokenizers, os.path.join(out, "tokenizers"), dirs_exist_ok=True)
    return out


def export(run_dir: str, out: str, tokenizers: str | None = None, shard_mb: float = 2000.0) -> str:
    state, run_cfg = consolidate(run_dir)
    if any(k.endswith(".lora_A") for k in state):   # a LoRA fine-tune: merge into plain weights
        from mmfm.models.lora import merge_lora_state

        ft = run_cfg.get("finetune") or {}
        state = merge_lora_state(state, float(ft["lora_alpha"]) / int(ft["lora_rank"]))
    cfg = ModelConfig(**run_cfg["model"])
    return write_folder(state, cfg, out, run_cfg["data"].get("vocab") or None, tokenizers, shard_mb)


def cmd_export(args) -> int:
    out = export(args.run, args.out, args.tokenizers, args.shard_mb)
    print(f"export: {out} (safetensors, config.json, vocab.json{', tokenizers' if args.tokenizers else ''})")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="consolidate a run's ZeRO checkpoint into safetensors + a Hugging Face folder")
    p.add_argument("run", help="pretrain output folder (or its checkpoints/ folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizers", default=None, help="folder of trained tokenizers to copy in")
    p.add_argument("--shard-mb", type=float, default=2000.0, help="safetensors shard size")
