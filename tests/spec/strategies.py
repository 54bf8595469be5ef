"""Hypothesis strategies for small, valid specs and for equivalent spellings of a layer pattern.

A drawn spec respects every cross-field rule of the schema (KV heads divide heads, an even rope_dim,
top_k within the kept expert groups, schedules within their stage's budget, ...), so any failure
to validate or round-trip it is a bug in lmspec, not in the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from lmspec.spec import Spec
from lmspec.spec.limits import MAX_STEPS

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)
FLOATS = st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False)
FRACTION = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
BETA = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


# ---------------------------------------------------------------------------------------------
# Layer patterns as trees, rendered in several equivalent ways
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """`atom*count`, where atom is a block name or a group of items."""

    atom: str | tuple[Item, ...]
    count: int

    def expand(self) -> list[str]:
        inner = [self.atom] if isinstance(self.atom, str) else [n for it in self.atom for n in it.expand()]
        return inner * self.count


def expand(items: tuple[Item, ...]) -> list[str]:
    return [n for it in items for n in it.expand()]


def pattern_trees(names: list[str], depth: int = 2) -> st.SearchStrategy[tuple[Item, ...]]:
    leaf = st.builds(Item, st.sampled_from(names), st.integers(1, 4))
    if depth == 0:
        return st.lists(leaf, min_size=1, max_size=4).map(tuple)
    group = st.builds(Item, pattern_trees(names, depth - 1), st.integers(1, 3))
    return st.lists(st.one_of(leaf, group), min_size=1, max_size=4).map(tuple)


def render(items: tuple[Item, ...]) -> str:
    """The canonical spelling: `name*n` and `( ... )*n`, a count of 1 left out."""
    return " ".join(_render_item(it) for it in items)


def _render_item(it: Item) -> str:
    atom = it.atom if isinstance(it.atom, str) else f"({render(it.atom)})"
    return atom if it.count == 1 else f"{atom}*{it.count}"


@st.composite
def rewrites(draw, items: tuple[Item, ...]) -> str:
    """An equivalent spelling: peel one repeat off (`S*4` -> `S S*3`), unroll a group
    (`(A B)*2` -> `A B A B`), add redundant parentheses or `*1`, vary whitespace."""
    parts = []
    for it in items:
        atom = it.atom if isinstance(it.atom, str) else f"({draw(rewrites(it.atom))})"
        how = draw(st.sampled_from(["same", "peel", "unroll", "paren", "star1"]))
        if how == "peel" and it.count > 1:
            rest = atom if it.count == 2 else f"{atom}*{it.count - 1}"
            parts.append(f"{atom} {rest}")
        elif how == "unroll":
            parts.append(" ".join([atom] * it.count))
        elif how == "paren":
            parts.append(f"({atom})*{it.count}")
        elif how == "star1" and it.count == 1:
            parts.append(f"{atom}*1")
        else:
            parts.append(atom if it.count == 1 else f"{atom}*{it.count}")
    sep = draw(st.sampled_from([" ", "  ", "\t", " \n "]))
    return sep.join(parts)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_kinds(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    fraction = draw(st.sampled_from([1.0, 0.5, 0.25]))
    out = {
        "num_heads": heads,
        "num_kv_heads": draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])),
        "qk_head_dim": 8 * draw(st.integers(1, 6)),  # any fraction above gives an even rope_dim
        "v_head_dim": draw(st.integers(1, 48)),
        "rope": {"theta": draw(FLOATS), "fraction": fraction},
        "value_scale": draw(FLOATS),
        "sink": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "softmax_scale": draw(st.none() | FLOATS),
    }
    if draw(st.booleans()):
        return {"kind": "global", **out}
    window = {
        "window": draw(st.integers(1, 300)),
        "window_convention": draw(st.sampled_from(["previous_plus_self", "keys"])),
    }
    return {"kind": "sliding", **window, **out}


@st.composite
def ffn_kinds(draw) -> dict:
    if draw(st.booleans()):
        return {"kind": "dense", "intermediate_size": draw(st.integers(1, 128)), "activation": "silu"}
    groups = draw(st.sampled_from([1, 2, 4]))
    experts = groups * draw(st.integers(1 if groups == 1 else 2, 6))  # a group holds at least 2 experts
    kept = draw(st.integers(1, groups))
    top_k = draw(st.integers(1, kept * (experts // groups) if groups > 1 else experts))
    return {
        "kind": "moe",
        "num_experts": experts,
        "top_k": top_k,
        "expert_intermediate_size": draw(st.integers(1, 64)),
        "num_shared_experts": draw(st.integers(0, 2)),
        "score_function": draw(st.sampled_from(["sigmoid", "softmax"])),
        "correction_bias": draw(st.booleans()),
        "renormalize": draw(st.booleans()),
        "routed_scaling_factor": draw(FLOATS),
        "num_groups": groups,
        "top_k_groups": kept,
        "activation": "silu",
    }


@st.composite
def stages(draw, attention_names: list[str], max_positions: int = 1 << 18) -> dict:
    size = draw(st.integers(1, 4096))
    seq_len = draw(st.integers(1, max_positions))
    # At most a third of the step limit per stage (a spec draws up to three), so every schedule is valid.
    most = min(1e13, MAX_STEPS / 3 * size * seq_len)
    tokens = draw(st.floats(min_value=1.0, max_value=most, allow_nan=False))
    kind = draw(st.sampled_from(["constant", "cosine", "linear", "wsd"]))
    peak = draw(FLOATS)
    warmup = draw(FRACTION) * tokens / 2
    lr = {
        "kind": kind,
        "peak": peak,
        "final": draw(FRACTION) * peak,
        "warmup_tokens": warmup,
        "warmup_start": draw(FRACTION) * peak,
        "decay_shape": draw(st.sampled_from(["cosine", "linear"])),
    }
    if kind == "wsd":
        lr["decay_tokens"] = draw(FRACTION) * tokens / 2
    batch = {"size": size, "warmup_tokens": draw(FRACTION) * tokens}
    if draw(st.booleans()):
        batch["warmup_start"] = draw(st.integers(1, size))
    overrides = {}
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(attention_names), unique=True))
        overrides["rope_theta"] = {k: draw(FLOATS) for k in chosen}
    for key in ("mtp_loss_weight", "bias_update", "seq_aux_coef"):
        if draw(st.booleans()):
            overrides[key] = draw(FRACTION)
    return {
        "name": draw(NAMES),
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch,
        "lr": lr,
        "overrides": overrides,
    }


@st.composite
def spec_data(draw) -> dict:
    """Plain data (as a YAML file would hold it) for a small valid spec."""
    names = st.lists(NAMES, min_size=1, max_size=3, unique=True)
    attention = {n: draw(attention_kinds()) for n in draw(names)}
    ffn = {n: draw(ffn_kinds()) for n in draw(names)}
    block_names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    blocks = {
        n: {"attention": draw(st.sampled_from(sorted(attention))), "ffn": draw(st.sampled_from(sorted(ffn)))}
        for n in block_names
    }
    windows = [a["window"] for a in attention.values() if a["kind"] == "sliding"]
    max_positions = draw(st.integers(max([1, *windows]), 1 << 20))
    model = {
        "vocab_size": draw(st.integers(1, 1000)),
        "hidden_size": draw(st.integers(1, 256)),
        "max_position_embeddings": max_positions,
        "norm": {"kind": "rmsnorm", "eps": draw(FLOATS)},
        "tie_word_embeddings": draw(st.booleans()),
        "init_std": draw(FLOATS),
        "attention": attention,
        "ffn": ffn,
        "blocks": blocks,
        "layers": render(draw(pattern_trees(block_names))),
    }
    depth = 0
    if draw(st.booleans()):
        depth = draw(st.integers(0, 3))
        model["mtp"] = {
            "num_blocks": depth,
            "block": draw(st.sampled_from(block_names)),
            "loss_weight": draw(FRACTION),
        }
    data = {"name": draw(NAMES), "model": model}
    if draw(st.booleans()):
        data["training"] = {
            "optimizer": {
                "kind": "adamw",
                "betas": [draw(BETA), draw(BETA)],
                "eps": draw(FLOATS),
                "weight_decay": draw(FRACTION),
            },
            "grad_clip": draw(st.none() | FLOATS),
            "precision": draw(st.sampled_from(["fp32", "bf16"])),
            "balancing": {"bias_update": draw(FRACTION), "seq_aux_coef": draw(FRACTION)},
            "seed": draw(st.integers(0, 2**31)),
            "stages": draw(
                st.lists(
                    stages(sorted(attention), max_positions),
                    min_size=1,
                    max_size=3,
                    unique_by=lambda s: s["name"],
                )
            ),
        }
    if draw(st.booleans()):
        data["serving"] = {
            "speculative_depth": draw(st.integers(0, depth)),
            "chat_template": draw(st.text(max_size=40)),
            "temperature": draw(FRACTION) * 2,
            "top_p": draw(st.floats(1e-3, 1.0)),
        }
    return data


def specs() -> st.SearchStrategy[Spec]:
    return spec_data().map(Spec.model_validate)


@st.composite
def tiny_spec_data(draw) -> dict:
    """A valid spec as `spec_data` draws it, shrunk to dimensions a CPU builds and steps in a second:
    at most 4 decoder layers and 2 MTP blocks, hidden size at most 32, vocabulary at most 64."""
    data = draw(spec_data())
    m = data["model"]
    blocks = sorted(m["blocks"])
    m["layers"] = " ".join(draw(st.lists(st.sampled_from(blocks), min_size=1, max_size=4)))
    m["hidden_size"] = draw(st.integers(1, 32))
    m["vocab_size"] = draw(st.integers(1, 64))
    if "mtp" in m:
        m["mtp"]["num_blocks"] = min(m["mtp"]["num_blocks"], 2)
        if "serving" in data:
            data["serving"]["speculative_depth"] = min(
                data["serving"]["speculative_depth"], m["mtp"]["num_blocks"]
            )
    return data
