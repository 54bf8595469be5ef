"""Kernel constants the tests render: MiMo-V2-Flash's real attention variants and small odd ones."""

MIMO_SWA = {
    "window_keys": 129,
    "sink": True,
    "qk_head_dim": 192,
    "v_head_dim": 128,
    "value_scale": 0.707,
    "rope_dim": 64,
}
MIMO_FULL = {
    "window_keys": None,
    "sink": False,
    "qk_head_dim": 192,
    "v_head_dim": 128,
    "value_scale": 0.707,
    "rope_dim": 64,
}
SMALL_W128 = {
    "window_keys": 128,
    "sink": True,
    "qk_head_dim": 24,
    "v_head_dim": 16,
    "value_scale": 1.0,
    "rope_dim": 8,
}
SMALL_W5 = {
    "window_keys": 5,
    "sink": True,
    "qk_head_dim": 40,
    "v_head_dim": 24,
    "value_scale": 0.5,
    "rope_dim": 16,
}
SMALL_FULL = {
    "window_keys": None,
    "sink": False,
    "qk_head_dim": 20,
    "v_head_dim": 12,
    "value_scale": 1.0,
    "rope_dim": 6,
}
SMALL_W3_NOSINK = {
    "window_keys": 3,
    "sink": False,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    "value_scale": 1.0,
    "rope_dim": 16,
}

ATTENTION_VARIANTS = [MIMO_SWA, MIMO_FULL, SMALL_W128, SMALL_W5, SMALL_FULL, SMALL_W3_NOSINK]

MOE_SIGMOID = {
    "num_experts": 8,
    "top_k": 3,
    "score_function": "sigmoid",
    "renormalize": True,
    "routed_scaling_factor": 1.0,
}
MOE_SOFTMAX = {
    "num_experts": 12,
    "top_k": 2,
    "score_function": "softmax",
    "renormalize": False,
    "routed_scaling_factor": 2.5,
}

EPS = 1e-5
VOCAB = 1000

TEST_CONSTANTS = {
    "attention": ATTENTION_VARIANTS,
    "moe": MOE_SIGMOID,
    "rmsnorm": {"eps": EPS},
    "lm_head_ce": {"vocab_size": VOCAB},
}
