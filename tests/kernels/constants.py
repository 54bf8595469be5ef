"""Kernel variants the tests render: MiMo-V2-Flash's real attention variants and small odd ones."""

from lmspec.compiler.variants import (
    AttentionVariant,
    DecodeAttentionVariant,
    LMHeadCEVariant,
    MoEVariant,
    RMSNormVariant,
    RoPEVariant,
    SwiGLUVariant,
)

MIMO_SLIDING = AttentionVariant(
    window_keys=129, sink=True, qk_head_dim=192, v_head_dim=128, value_scale=0.707
)
MIMO_GLOBAL = AttentionVariant(
    window_keys=None, sink=False, qk_head_dim=192, v_head_dim=128, value_scale=0.707
)
SMALL_W128 = AttentionVariant(window_keys=128, sink=True, qk_head_dim=24, v_head_dim=16)
SMALL_W5 = AttentionVariant(window_keys=5, sink=True, qk_head_dim=40, v_head_dim=24, value_scale=0.5)
SMALL_GLOBAL = AttentionVariant(window_keys=None, sink=False, qk_head_dim=20, v_head_dim=12)
SMALL_W3_NOSINK = AttentionVariant(window_keys=3, sink=False, qk_head_dim=16, v_head_dim=16)

ATTENTION_VARIANTS = (MIMO_SLIDING, MIMO_GLOBAL, SMALL_W128, SMALL_W5, SMALL_GLOBAL, SMALL_W3_NOSINK)
DECODE_VARIANTS = tuple(DecodeAttentionVariant(**v.constants()) for v in ATTENTION_VARIANTS)

# One rotary variant per attention variant above (rope_dim even, at most qk_head_dim).
ROPE_VARIANTS = (
    RoPEVariant(rope_dim=64, qk_head_dim=192),
    RoPEVariant(rope_dim=8, qk_head_dim=24),
    RoPEVariant(rope_dim=16, qk_head_dim=40),
    RoPEVariant(rope_dim=6, qk_head_dim=20),
    RoPEVariant(rope_dim=16, qk_head_dim=16),
)

MOE_SIGMOID = MoEVariant(num_experts=8, top_k=3)
MOE_SOFTMAX = MoEVariant(
    num_experts=12, top_k=2, score_function="softmax", renormalize=False, routed_scaling_factor=2.5
)

NORM = RMSNormVariant(eps=1e-5)
EPS = NORM.eps
LM_HEAD_CE = LMHeadCEVariant(vocab_size=1000)
VOCAB = LM_HEAD_CE.vocab_size

TEST_VARIANTS = (
    NORM,
    SwiGLUVariant(),
    *ROPE_VARIANTS,
    *ATTENTION_VARIANTS,
    *DECODE_VARIANTS,
    MOE_SIGMOID,
    LM_HEAD_CE,
)
