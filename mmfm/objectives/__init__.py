"""Training objectives over unified token sequences.

Every objective turns a packed batch into the same four tensors, so the model, the loss and the
per-modality report are shared:

    prepare(ids [B, L], modality_ids [B, L] (= vocab.modality_table()[ids]), valid [B, L] bool, generator) -> Prepared:
        input_ids   what the model reads (masked objectives put <mask> where inputs are hidden)
        labels      the id each position must predict, -100 where there is no loss
        label_mod   modality id of each label (per-modality losses and weights)
        attn_mask   None (causal) or bool [B, L, L], True = may attend

    ar        next-token prediction (Chameleon-style), per-modality loss masks and weights
    masked    4M-style: Dirichlet input/target budgets per modality, bidirectional attention
    hybrid    BAMM-style: a causal prefix and a masked suffix in one sequence and one mask

A model with a flow head (Flow-Omni / xAR) trains it jointly through `joint_loss_and_report` when a
batch carries continuous targets (`Prepared.with_latents`), weighted by `flow_weight`.

Each is registered in `OBJECTIVES` under that name, the `kind` of a config's `objective:` section.
"""
from mmfm.objectives.base import (ObjectiveConfig, Prepared, build_objective, joint_loss_and_report, loss_and_report,
                                  model_loss_and_report)
from mmfm.objectives.base import OBJECTIVES, objective_config_from_dict

__all__ = ["ObjectiveConfig", "Prepared", "build_objective", "joint_loss_and_report", "loss_and_report",
           "model_loss_and_report", "OBJECTIVES", "objective_config_from_dict"]
