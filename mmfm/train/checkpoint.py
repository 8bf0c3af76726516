"""Atomic DeepSpeed checkpoints, last K kept, exact resume.

Layout under <out>/checkpoints/:

    step_00000040/            engine.save_checkpoint(tag=...): DeepSpeed's model and ZeRO optimizer
                              shards, plus mmfm_rank<r>.pt per rank (step, counters, RNG states, the
                              data loader's state_dict, the objective's generator) and, last, COMPLETE
    latest                    the tag of the newest COMPLETE checkpoint (written tmp + os.replace)

A save is: every rank writes its DeepSpeed shards and its mmfm_rank file; barrier; rank 0 writes
COMPLETE in the tag folder, then replaces `latest`, then deletes the oldest complete tags beyond
keep_last and any incomplete leftovers. A crash anywhere before `latest` is replaced leaves it
pointing at the previous checkpoint, which is untouched; resume reads only what `latest` names.

`save(..., after_shards=f)` calls f(step) after this rank's shards are written and before COMPLETE /
`latest`: the Trainer passes its hooks' `on_checkpoint_shards` there, so a test can kill the process
inside a checkpoint write (mmfm/train/trainer.py: Hooks).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"    # the elastic-resume conversion inside a tag folder (load)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: str) -> str | None:
    p = os.path.join(root, LATEST)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        tag = f.read().strip()
    if not os.path.exists(os.path.join(root, tag, COMPLETE)):
        raise RuntimeError(f"{p} names {tag}, which has no {COMPLETE} marker: the checkpoint folder was edited by hand")
    return tag


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save(engine, root: str, step: int, state: dict, keep_last: int,
         after_shards: Callable[[int], None] | None = None) -> str:
    """state: this rank's extra state (picklable, saved with torch.save)."""
    dist = torch.distributed
    rank = dist.get_rank()
    tag = tag_for(step)
    os.makedirs(root, exist_ok=True)
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    torch.save({**state, "rng": rng_state()}, os.path.join(root, tag, f"mmfm_rank{rank}.pt"))
    if after_shards is not None:
        after_shards(step)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(root, tag, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
        prune(root, keep_last, tag)
    dist.barrier()
    return tag


def prune(root: str, keep_last: int, current: str) -> None:
    tags = sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.isdir(os.path.join(root, t)))
    complete = [t for t in tags if os.path.exists(os.path.join(root, t, COMPLETE))]
    keep = set(complete[-keep_last:]) | {current}
    for t in tags:
        if t not in keep and t <= current:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def saved_world_size(folder: str) -> int:
    """The number of ranks that wrote a checkpoint folder: one mmfm_rank<r>.pt per rank."""
    return len([f for f in os.listdir(folder) if re.fullmatch(r"mmfm_rank\d+\.pt", f)])


def _sharded_optimizer(folder: str) -> bool:
    """Whether the optimizer state is split over the saving ranks (ZeRO 1-3, or DeepSpeed's bf16
    optimizer, which partitions its fp32 master even at stage 0); a plain stage-0 optimizer sits
    whole in mp_rank_00_model_states.pt and loads at any number of ranks."""
    return any(re.match(r"(bf16_)?zero_pp_rank_\d+_", f) for f in os.listdir(folder))


def to_universal(folder: str) -> str:
    """Converts a ZeRO checkpoint folder to DeepSpeed's universal layout (one fp32 tensor and one
    file per optimizer state for every parameter, independent of the number of ranks) in
    <folder>/universal; returns that path. Written to a temporary folder and renamed, so a crash
    leaves no half-converted folder; an existing conversion is reused. Rank 0 only."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(folder, UNIVERSAL)
    if os.path.isdir(out):
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: mmfm's checkpoints carry no Megatron tensor-parallel patterns, and need none
    args = argparse.Namespace(input_folder=folder, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    os.replace(tmp, out)
    return out


def load(engine, root: str) -> dict | None:
    """Loads the newest complete checkpoint into the engine; returns this rank's extra state or None.

    At another number of ranks than the checkpoint was written with (elastic resume): a sharded
    optimizer state is converted once to DeepSpeed's universal checkpoint (to_universal) and
    re-partitioned over the current ranks as it loads; every rank then takes rank 0's mmfm state.
    That is exact for the Trainer, whose step, counters, data position and generator are the same
    on every rank (each rank reads the whole global stream and takes its rows of it)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(root, tag)
    saved = saved_world_size(folder)
    if saved == 0:
        raise RuntimeError(f"{folder} has no mmfm_rank0.pt: not a checkpoint written by mmfm's Trainer")
    universal = saved != world and _sharded_optimizer(folder)
    if universal:
        path = load_universal(engine, folder)
    else:
        path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    f = os.path.join(folder, f"mmfm_rank{rank if saved == world else 0}.pt")
    state = torch.load(f, map_location="cpu", weights_only=False)  # our own file: RNG states hold numpy/tuples
    set_rng_state(state.pop("rng"))
    state["tag"] = tag
    state["saved_world_size"] = saved
    return state


def load_universal(engine, folder: str):
    """Loads checkpoint folder `folder` into the engine through DeepSpeed's universal checkpoint
    (converted once, by rank 0), re-partitioning weights and optimizer state over this run's ranks.
    Returns DeepSpeed's load path (None when it failed). Two repairs after DeepSpeed 0.19's ZeRO-3
    universal load (load_hp_checkpoint_state_from_checkpoint_dir_stage3), without which a resumed
    run drifts from the uninterrupted one from its second step on:
    - it gives every param group group 0's settings ("the hyperparameters of each parameter should
      be the same"), so the no-decay group (norms, embeddings) would be decayed: the groups'
      settings come from the run's config, so they are put back;
    - it stores ONE step tensor object as the Adam step of every sub-group (param group). torch's
      AdamW increments its step in place, once per sub-group, so after the first resumed step the
      shared counter had advanced once per group: the later groups took their update with a step
      count 1, 2, ... too high, i.e. the wrong bias correction (5e-4 relative in the loss of the
      second step after a 2 -> 4 rank resume). Each sub-group gets its own copy."""
    dist = torch.distributed
    if dist.get_rank() == 0:
        to_universal(folder)
    dist.barrier()
    cfg = engine._config       # DeepSpeed reads the switch from its config at load time, not at build
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    cfg.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(folder, tag=UNIVERSAL, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:
        cfg.load_universal_checkpoint = False
    for g, settings in zip(engine.optimizer.param_groups, groups):
        g.update(settings)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)   # the torch optimizer inside ZeRO's
    seen: set[int] = set()
    for st in getattr(base, "state", {}).values():
        step = st.get("step") if isinstance(st, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                st["step"] = step.clone()
            seen.add(id(st["step"]))
    return path


# ------------------------------------------------------------------ consolidation (export, init_from)
def run_dir_of(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.basename(path) == "checkpoints":
        return os.path.dirname(path)
    return path


def consolidate(run_dir: str) -> tuple[dict, dict]:
    """(fp32 mmfm state dict, run config dict) from a pretrain output folder."""
    run_dir = run_dir_of(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        run_cfg = json.load(f)
    ckdir = os.path.join(run_dir, "checkpoints")
    tag = latest_tag(ckdir)
    if tag is None:
        raise FileNotFoundError(f"{ckdir}: no complete checkpoint (no 'latest')")
    if run_cfg.get("zero_stage", 0) == 0:
        sd = torch.load(os.path.join(ckdir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckdir, tag=tag)
    return {k: v.float().contiguous() for k, v in sd.items()}, run_cfg


def load_state_into(model, source: str) -> None:
    """train.init_from: an export folder or a pretrain output folder."""
    if os.path.exists(os.path.join(source, "mmfm_model.json")):
        from mmfm.models.io import read_state

        state, _ = read_state(source)
    else:
        state, _ = consolidate(source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lora" not in m]:
        raise ValueError(f"init_from {source}: missing {missing[:3]}, unexpected {unexpected[:3]}")
