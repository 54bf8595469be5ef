"""The op vocabulary of the graph IR: what each op means, its shape rule and who executes it.

Every node's `op` is a key of `OPS`. An op's `family` says which runtime op family executes it:
one of the backend families (`rmsnorm`, `swiglu`, `rope`, `attention`, `moe`, `lm_head_ce`) or
`native` for plain tensor code the generated module writes inline (a linear layer, an add, a
concat). The table is the compiler's own copy of what the runtime implements; the compiler never
imports the runtime, and `lmspec.runtime.ops.OP_FAMILIES` is tied to it by a test.

Shape rules take the ordered input shapes, the node's parameter and buffer shapes by name relative
to the node's module path (e.g. `weight`, `gate_proj.weight`) and its attributes, and return the output shape. Shapes are tuples of ints and the
symbols "B" (batch) and "T" (sequence). A rule raises `ShapeError` with a sentence a user can act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Dim = int | str
Shape = tuple[Dim, ...]

# The op families the runtime backends implement (mirrors lmspec.runtime.ops.OP_FAMILIES's keys),
# plus `native`: inline tensor code in the generated module.
BACKEND_FAMILIES: frozenset[str] = frozenset(
    {"rmsnorm", "swiglu", "rope", "attention", "moe", "lm_head_ce", "native"}
)


class ShapeError(ValueError):
    """An op's inputs or weights have shapes its rule cannot accept."""


ShapeRule = Callable[[list[Shape], dict[str, Shape], dict[str, Any]], Shape]


@dataclass(frozen=True)
class OpDef:
    name: str
    family: str
    doc: str
    rule: ShapeRule
    fused: bool = False  # a unit produced by the fusion pass


def _one(inputs: list[Shape], n: int, op: str) -> None:
    if len(inputs) != n:
        raise ShapeError(f"{op} takes {n} input(s), got {len(inputs)}")


def _last(shape: Shape, want: int, what: str) -> None:
    if shape[-1] != want:
        raise ShapeError(f"{what}: expected last dim {want}, got shape {shape}")


def _input(inputs, params, attrs):
    _one(inputs, 0, "input")
    return tuple(attrs["shape"])


def _same(n: int, op: str):
    def rule(inputs, params, attrs):
        _one(inputs, n, op)
        for s in inputs[1:]:
            if s != inputs[0]:
                raise ShapeError(f"{op}: inputs must have equal shapes, got {inputs[0]} and {s}")
        return inputs[0]

    return rule


def _embedding(inputs, params, attrs):
    _one(inputs, 1, "embedding")
    vocab, hidden = params["weight"]
    return (*inputs[0], hidden)


def _rmsnorm(inputs, params, attrs):
    _one(inputs, 1, "rmsnorm")
    _last(inputs[0], params["weight"][0], "rmsnorm weight")
    return inputs[0]


def _linear(inputs, params, attrs):
    _one(inputs, 1, "linear")
    out_features, in_features = params["weight"]
    _last(inputs[0], in_features, "linear input vs weight (out, in)")
    if "bias" in params and params["bias"] != (out_features,):
        raise ShapeError(f"linear bias: expected ({out_features},), got {params['bias']}")
    return (*inputs[0][:-1], out_features)


def _heads(shape: Shape, heads: int, dim: int, what: str) -> None:
    if shape[-1] != heads * dim:
        raise ShapeError(
            f"{what}: expected {heads} heads x {dim} = {heads * dim} features, got shape {shape}"
        )


def _rope(inputs, params, attrs):
    _one(inputs, 1, "rope")
    _heads(inputs[0], attrs["num_heads"], attrs["qk_head_dim"], "rope input")
    rope_dim = attrs["rope_dim"]
    if rope_dim > attrs["qk_head_dim"]:
        raise ShapeError(f"rope_dim ({rope_dim}) exceeds qk_head_dim ({attrs['qk_head_dim']})")
    if rope_dim <= 0 or rope_dim % 2:
        raise ShapeError(f"rope_dim must be even and positive (rotate-half pairs dims), got {rope_dim}")
    return inputs[0]


def _value_scale(inputs, params, attrs):
    _one(inputs, 1, "value_scale")
    return inputs[0]


def _attention(inputs, params, attrs):
    _one(inputs, 3, "attention")
    q, k, v = inputs
    hq, hkv = attrs["num_heads"], attrs["num_kv_heads"]
    if hq % hkv:
        raise ShapeError(f"attention: num_kv_heads ({hkv}) must divide num_heads ({hq}) for GQA")
    _heads(q, hq, attrs["qk_head_dim"], "attention q")
    _heads(k, hkv, attrs["qk_head_dim"], "attention k")
    _heads(v, hkv, attrs["v_head_dim"], "attention v")
    if q[:-1] != k[:-1] or k[:-1] != v[:-1]:
        raise ShapeError(f"attention: q, k, v leading dims differ: {q}, {k}, {v}")
    if attrs["sink"] and params.get("sinks") != (hq,):
        raise ShapeError(f"attention sinks: expected ({hq},), got {params.get('sinks')}")
    return (*q[:-1], hq * attrs["v_head_dim"])


def _concat(inputs, params, attrs):
    _one(inputs, 2, "concat")
    a, b = inputs
    if a[:-1] != b[:-1]:
        raise ShapeError(f"concat: leading dims differ: {a} and {b}")
    return (*a[:-1], a[-1] + b[-1])


def _shift(inputs, params, attrs):
    _one(inputs, 1, "shift_tokens")
    return inputs[0]


def _bias_add(inputs, params, attrs):
    _one(inputs, 1, "correction_bias")
    _last(inputs[0], params["e_score_correction_bias"][0], "correction bias")
    return inputs[0]


def _topk(inputs, params, attrs):
    # (selection, scores), or (scores,) alone when selection uses the raw scores (no correction bias).
    if len(inputs) not in (1, 2):
        raise ShapeError(f"topk takes 1 or 2 inputs, got {len(inputs)}")
    selection, scores = inputs[0], inputs[-1]
    if selection != scores:
        raise ShapeError(f"topk: selection and scores differ: {selection} and {scores}")
    if attrs["top_k"] > selection[-1]:
        raise ShapeError(f"topk: top_k ({attrs['top_k']}) exceeds num_experts ({selection[-1]})")
    return (*selection[:-1], attrs["top_k"])


def _experts(inputs, params, attrs):
    _one(inputs, 2, "experts")
    x, weights = inputs
    e, two_i, h = params["gate_up_proj"]
    e2, h2, i = params["down_proj"]
    if e != e2 or two_i != 2 * i or h != h2:
        raise ShapeError(
            f"experts: gate_up_proj (E, 2I, H) = {params['gate_up_proj']} and down_proj (E, H, I) = "
            f"{params['down_proj']} disagree"
        )
    _last(x, h, "experts input vs hidden size")
    if weights != (*x[:-1], attrs["top_k"]):
        raise ShapeError(
            f"experts: routing weights {weights} do not match tokens {x[:-1]} x top_k {attrs['top_k']}"
        )
    return x


def _cross_entropy(inputs, params, attrs):
    _one(inputs, 2, "cross_entropy")
    logits, labels = inputs
    if logits[:-1] != labels:
        raise ShapeError(f"cross_entropy: logits {logits} and labels {labels} disagree")
    return ()


def _add_rmsnorm(inputs, params, attrs):
    _one(inputs, 2, "add_rmsnorm")
    _same(2, "add_rmsnorm")(inputs, params, attrs)
    return _rmsnorm(inputs[:1], params, attrs)


def _swiglu(inputs, params, attrs):
    _one(inputs, 1, "swiglu")
    gate = _linear(inputs, {"weight": params["gate_proj.weight"]}, attrs)
    up = _linear(inputs, {"weight": params["up_proj.weight"]}, attrs)
    return _same(2, "swiglu")([gate, up], params, attrs)


def _router(inputs, params, attrs):
    _one(inputs, 1, "router")
    logits = _linear(inputs, {"weight": params["weight"]}, attrs)
    return _topk([logits], params, attrs)


def _lm_head_ce(inputs, params, attrs):
    _one(inputs, 2, "lm_head_ce")
    hidden, labels = inputs
    logits = _linear([hidden], params, attrs)
    return _cross_entropy([logits, labels], params, attrs)


_DEFS = [
    OpDef("input", "native", "graph input (token ids or labels)", _input),
    OpDef(
        "shift_tokens",
        "native",
        "tokens k positions ahead (MTP inputs and targets); -100 past the end",
        _shift,
    ),
    OpDef("embedding", "native", "token embedding lookup", _embedding),
    OpDef("rmsnorm", "rmsnorm", "RMSNorm with a learned weight", _rmsnorm),
    OpDef("linear", "native", "x @ W.T (+ b)", _linear),
    OpDef("rope", "rope", "rotary embedding on the leading rope_dim dims of each head", _rope),
    OpDef(
        "value_scale", "attention", "values times value_scale (an argument of the attention op)", _value_scale
    ),
    OpDef(
        "attention", "attention", "causal GQA attention, global or sliding, optional sink logit", _attention
    ),
    OpDef("add", "native", "residual add", _same(2, "add")),
    OpDef("concat", "native", "concatenate on the feature dim", _concat),
    OpDef("silu_mul", "swiglu", "silu(gate) * up", _same(2, "silu_mul")),
    OpDef("sigmoid", "moe", "router scores: sigmoid of the logits", _same(1, "sigmoid")),
    OpDef("softmax", "moe", "router scores: softmax of the logits", _same(1, "softmax")),
    OpDef("correction_bias", "moe", "scores + e_score_correction_bias, used for selection only", _bias_add),
    OpDef(
        "topk", "moe", "top-k experts on the selection scores; weights gathered from the raw scores", _topk
    ),
    OpDef("renormalize", "moe", "top-k weights divided by their sum", _same(1, "renormalize")),
    OpDef("routed_scale", "moe", "top-k weights times routed_scaling_factor", _same(1, "routed_scale")),
    OpDef("experts", "moe", "grouped SwiGLU experts weighted by the router", _experts),
    OpDef("cross_entropy", "native", "mean next-token cross-entropy over labels != -100", _cross_entropy),
    OpDef(
        "add_rmsnorm", "rmsnorm", "fused residual add + RMSNorm (returns norm and sum)", _add_rmsnorm, True
    ),
    OpDef("swiglu", "swiglu", "fused gate/up projections + silu(gate) * up", _swiglu, True),
    OpDef("router", "moe", "fused scores + correction bias + top-k + renorm + scale", _router, True),
    OpDef(
        "lm_head_ce",
        "lm_head_ce",
        "fused LM head + cross-entropy, logits never materialised",
        _lm_head_ce,
        True,
    ),
]

OPS: dict[str, OpDef] = {d.name: d for d in _DEFS}

# Fusion units, in the order the fusion pass applies them.
FUSED_UNITS: tuple[str, ...] = ("add_rmsnorm", "swiglu", "router", "lm_head_ce")


def infer_shape(op: str, inputs: list[Shape], params: dict[str, Shape], attrs: dict[str, Any]) -> Shape:
    """Output shape of `op`; raises KeyError for an unknown op and ShapeError for bad shapes."""
    return OPS[op].rule(inputs, params, attrs)
