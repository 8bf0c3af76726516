"""Source files that `mmfm export` copies into a modality-sparse export, for transformers'
trust_remote_code loading: configuration_mmfm.py and modeling_mmfm.py. They import torch and
transformers only (never mmfm), because they run where mmfm may not be installed; mmfm itself
never imports them (tests load them through transformers, from an export folder)."""
