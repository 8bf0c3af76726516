"""transformers config of an mmfm modality-sparse (Mixture-of-Transformers) export, written by
`mmfm export` beside modeling_mmfm.py. Self-contained: imports transformers only."""
from transformers import PretrainedConfig


class MmfmConfig(PretrainedConfig):
    """Llama's fields plus `num_groups` (copies of every non-embedding weight) and `modality_runs`,
    [[start, stop, group], ...] covering [0, vocab_size): token id t uses the weights of the group of
    the run holding t (mmfm's Vocab.modality_table, run-length coded)."""
    model_type = "mmfm_mot"

    def __init__(self, vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, head_dim=None, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, num_groups=2,
                 modality_runs=None, initializer_range=0.02, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.num_groups = num_groups
        self.modality_runs = modality_runs or [[0, vocab_size, 0]]
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
