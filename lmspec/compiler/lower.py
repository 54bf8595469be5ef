"""Lowering: Spec -> Graph, one op node per step of the transformers MiMo-V2-Flash forward.

The graph is the training graph: token ids and (already shifted) labels in, the main loss and one
loss per MTP block out. Node ids are unique dotted names; a node that owns a module uses the module
path as its id (`model.layers.3.self_attn.q_proj`), other nodes append their role to their owner's
path (`model.layers.3.attn_residual`). Shapes are left to the `shapes` pass so that every shape in
the IR comes from one set of rules (`lmspec.compiler.ops`).

Facts of the whole model that no op owns sit in `graph.nx.graph`: `name` (the spec's name),
`spec_hash` (its content hash) and `init_std`; codegen names them in headers and the init.

`lower(spec)` then `run_passes(graph)` is the whole compiler front: see `lmspec.compiler.passes`.
"""

from __future__ import annotations

from typing import Any

from lmspec.compiler.graph import Graph, LayerInfo
from lmspec.compiler.passes import PIPELINE, PassContext, run_passes
from lmspec.spec import DenseFFN, MoEFFN, SlidingAttention, Spec, spec_hash
from lmspec.spec.schema import AttentionBase

__all__ = ["PIPELINE", "PassContext", "activation_dtype", "lower", "run_passes"]

_TOKENS = ("B", "T")


def activation_dtype(spec: Spec) -> str:
    """Dtype of activations and weights: the training precision, float32 without a training section."""
    return "bfloat16" if spec.training is not None and spec.training.precision == "bf16" else "float32"


def _attention_attrs(a: AttentionBase, kind: str) -> dict[str, Any]:
    """The attributes of an attention node of attention kind `kind` (its name in `model.attention`)."""
    return {
        "kind": a.kind,
        "attention": kind,
        "window_keys": a.window_keys,
        # As written in the spec, for the generated comment; window_keys is what runs.
        "window": a.window if isinstance(a, SlidingAttention) else None,
        "window_convention": a.window_convention if isinstance(a, SlidingAttention) else None,
        "sink": a.sink,
        "num_heads": a.num_heads,
        "num_kv_heads": a.num_kv_heads,
        "gqa_group": a.num_heads // a.num_kv_heads,
        "qk_head_dim": a.qk_head_dim,
        "v_head_dim": a.v_head_dim,
        "scale": a.scale,
        "value_scale": a.value_scale,
    }


class _Builder:
    def __init__(self, spec: Spec) -> None:
        m = spec.model
        self.spec = spec
        self.m = m
        self.act = activation_dtype(spec)
        self.graph = Graph(spec=spec, layers=[], mtp_layers=[])

    def op(self, node_id: str, op: str, *inputs: str, path: str | None = None, **kw) -> str:
        kw.setdefault("dtype", self.act)
        return self.graph.add_op(node_id, op, inputs=inputs, path=path or node_id, **kw)

    def linear(
        self,
        node_id: str,
        x: str,
        out_features: int,
        in_features: int,
        *,
        bias: bool = False,
        weight: str | None = None,
        path: str | None = None,
        **kw,
    ) -> str:
        params = {weight or f"{node_id}.weight": (out_features, in_features)}
        if bias:
            params[f"{node_id}.bias"] = (out_features,)
        return self.op(node_id, "linear", x, path=path, params=params, **kw)

    def rmsnorm(self, node_id: str, x: str, *, scope: str) -> str:
        h = self.m.hidden_size
        return self.op(
            node_id,
            "rmsnorm",
            x,
            field="model.norm",
            scope=scope,
            params={f"{node_id}.weight": (h,)},
            attrs={"eps": self.m.norm.eps},
        )

    # -- one decoder layer --------------------------------------------------------------------

    def decoder_layer(self, p: str, block: str, x: str) -> str:
        """Pre-norm attention then pre-norm FFN, each with a residual; returns the layer output id."""
        m = self.m
        b = m.blocks[block]
        common = {"scope": p}

        n1 = self.rmsnorm(f"{p}.input_layernorm", x, scope=p)
        o = self.self_attention(p, b.attention, n1)
        r1 = self.op(f"{p}.attn_residual", "add", o, x, path=p, field=f"model.blocks.{block}", **common)

        n2 = self.rmsnorm(f"{p}.post_attention_layernorm", r1, scope=p)
        f = m.ffn[b.ffn]
        ffield = f"model.ffn.{b.ffn}"
        if isinstance(f, DenseFFN):
            out = self.swiglu_mlp(f"{p}.mlp", n2, f.intermediate_size, field=ffield, scope=p)
        else:
            out = self.moe(f"{p}.mlp", n2, f, field=ffield, scope=p)
        return self.op(f"{p}.mlp_residual", "add", out, r1, path=p, field=f"model.blocks.{block}", **common)

    def self_attention(self, p: str, kind: str, n1: str) -> str:
        """q/k/v projections, RoPE on q and k, value scale, attention and o_proj of layer `p`."""
        m = self.m
        a = m.attention[kind]
        afield = f"model.attention.{kind}"
        h = m.hidden_size
        sa = f"{p}.self_attn"
        common = {"scope": p}

        q = self.linear(
            f"{sa}.q_proj", n1, a.num_heads * a.qk_head_dim, h, bias=a.bias, field=afield, **common
        )
        k = self.linear(
            f"{sa}.k_proj", n1, a.num_kv_heads * a.qk_head_dim, h, bias=a.bias, field=afield, **common
        )
        v = self.linear(
            f"{sa}.v_proj", n1, a.num_kv_heads * a.v_head_dim, h, bias=a.bias, field=afield, **common
        )
        rope = {
            "rope_dim": a.rope_dim,
            "rope_freq_dim": a.rope_freq_dim,  # the d of theta ** (-2i / d); odd d rounds rope_dim up
            "qk_head_dim": a.qk_head_dim,
            "theta": a.rope.theta,
            "kind": kind,
        }
        # q and k rotate alike; only their head counts differ.
        q, k = (
            self.op(
                f"{sa}.rope_{which}",
                "rope",
                x,
                path=sa,
                field=f"{afield}.rope",
                attrs={**rope, "num_heads": heads},
                **common,
            )
            for which, x, heads in (("q", q, a.num_heads), ("k", k, a.num_kv_heads))
        )
        if a.value_scale != 1.0:
            v = self.op(
                f"{sa}.value_scale",
                "value_scale",
                v,
                path=sa,
                field=f"{afield}.value_scale",
                attrs={"value_scale": a.value_scale},
                **common,
            )
        attrs = _attention_attrs(a, kind)
        params = {f"{sa}.sinks": (a.num_heads,)} if a.sink else {}
        o = self.op(
            f"{sa}.attention",
            "attention",
            q,
            k,
            v,
            path=sa,
            field=afield,
            params=params,
            attrs=attrs,
            **common,
        )
        o = self.linear(f"{sa}.o_proj", o, h, a.num_heads * a.v_head_dim, field=afield, **common)
        return o

    def swiglu_mlp(self, mp: str, x: str, inter: int, *, field: str, scope: str) -> str:
        h = self.m.hidden_size
        g = self.linear(f"{mp}.gate_proj", x, inter, h, field=field, scope=scope)
        u = self.linear(f"{mp}.up_proj", x, inter, h, field=field, scope=scope)
        act = self.op(f"{mp}.act", "silu_mul", g, u, path=mp, field=field, scope=scope)
        return self.linear(f"{mp}.down_proj", act, h, inter, field=field, scope=scope)

    def moe(self, mp: str, x: str, f: MoEFFN, *, field: str, scope: str) -> str:
        h, e = self.m.hidden_size, f.num_experts
        gate = f"{mp}.gate"
        # The router runs in fp32 (transformers keeps it there; the paper trains it in fp32).
        r = {"path": gate, "field": field, "scope": scope, "dtype": "float32"}
        logits = self.linear(gate, x, e, h, **r)
        scores = self.op(f"{gate}.score", f.score_function, logits, **r)
        selection = scores
        if f.correction_bias:
            selection = self.op(
                f"{gate}.correction_bias",
                "correction_bias",
                scores,
                **r,
                buffers={f"{gate}.e_score_correction_bias": (e,)},
            )
        routing = {
            "top_k": f.top_k,
            "num_experts": e,
            "num_groups": f.num_groups,
            "top_k_groups": f.top_k_groups,
            "score_function": f.score_function,
            "renormalize": f.renormalize,
            "routed_scaling_factor": f.routed_scaling_factor,
        }
        topk_inputs = (selection, scores) if selection != scores else (scores,)
        w = self.op(f"{gate}.topk", "topk", *topk_inputs, **r, attrs=routing)
        if f.renormalize:
            w = self.op(f"{gate}.renormalize", "renormalize", w, **r)
        if f.routed_scaling_factor != 1.0:
            w = self.op(
                f"{gate}.routed_scale",
                "routed_scale",
                w,
                **r,
                attrs={"routed_scaling_factor": f.routed_scaling_factor},
            )
        i = f.expert_intermediate_size
        out = self.op(
            f"{mp}.experts",
            "experts",
            x,
            w,
            field=field,
            scope=scope,
            attrs=routing,
            params={f"{mp}.experts.gate_up_proj": (e, 2 * i, h), f"{mp}.experts.down_proj": (e, h, i)},
        )
        if f.num_shared_experts:
            shared = self.swiglu_mlp(
                f"{mp}.shared_experts", x, f.num_shared_experts * i, field=field, scope=scope
            )
            out = self.op(f"{mp}.shared_add", "add", out, shared, path=mp, field=field, scope=scope)
        return out

    # -- the whole model -------------------------------------------------------------------------

    def build(self) -> Graph:
        m, g = self.m, self.graph
        h, vocab = m.hidden_size, m.vocab_size
        g.nx.graph.update(name=self.spec.name, spec_hash=spec_hash(self.spec), init_std=m.init_std)
        ids = self.op(
            "input_ids",
            "input",
            path="model",
            field="model.vocab_size",
            dtype="int64",
            attrs={"shape": _TOKENS},
        )
        labels = self.op(
            "labels", "input", path="model", field="model.vocab_size", dtype="int64", attrs={"shape": _TOKENS}
        )
        embed_w = "model.embed_tokens.weight"
        x = self.op(
            "model.embed_tokens", "embedding", ids, field="model.vocab_size", params={embed_w: (vocab, h)}
        )
        for i, block in enumerate(m.layer_blocks):
            b = m.blocks[block]
            p = f"model.layers.{i}"
            g.layers.append(LayerInfo(i, block, b.attention, b.ffn, p))
            x = self.decoder_layer(p, block, x)
        hidden = x
        head_w = embed_w if m.tie_word_embeddings else "lm_head.weight"
        n = self.rmsnorm("model.norm", hidden, scope="model")
        logits = self.linear("lm_head", n, vocab, h, weight=head_w, field="model.vocab_size")
        ce = {"vocab_size": vocab}
        self.op(
            "loss",
            "cross_entropy",
            logits,
            labels,
            path="lm_head",
            field="model.vocab_size",
            dtype="float32",
            attrs=ce,
        )

        if m.mtp is not None:
            prev = hidden
            for j in range(m.mtp.num_blocks):
                prev = self.mtp_block(j, labels, prev, head_w)
        return g

    def mtp_block(self, j: int, labels: str, prev: str, head_w: str) -> str:
        """MTP block j and its loss; returns its hidden output, the next block's `prev`."""
        m, g = self.m, self.graph
        h, vocab = m.hidden_size, m.vocab_size
        embed_w = "model.embed_tokens.weight"
        ce = {"vocab_size": vocab}
        block = m.mtp.block
        b = m.blocks[block]
        k = j + 1  # block k combines h^{k-1}_t with x_{t+k} = labels[:, t+k-1]
        p = f"model.mtp.layers.{j}"
        g.mtp_layers.append(LayerInfo(j, block, b.attention, b.ffn, p))
        s = {"scope": p, "field": "model.mtp"}
        tokens = labels
        if k > 1:
            tokens = self.op(
                f"{p}.tokens",
                "shift_tokens",
                labels,
                path=p,
                dtype="int64",
                attrs={"offset": k - 1},
                **s,
            )
        targets = self.op(
            f"{p}.targets", "shift_tokens", labels, path=p, dtype="int64", attrs={"offset": k}, **s
        )
        emb = self.op(
            f"{p}.embed_tokens",
            "embedding",
            tokens,
            path="model.embed_tokens",
            params={embed_w: (vocab, h)},
            **s,
        )
        en = self.rmsnorm(f"{p}.enorm", emb, scope=p)
        hn = self.rmsnorm(f"{p}.hnorm", prev, scope=p)
        cat = self.op(f"{p}.concat", "concat", en, hn, path=p, **s)  # embedding first, hidden second
        x = self.linear(f"{p}.eh_proj", cat, h, 2 * h, **s)
        x = self.decoder_layer(p, block, x)
        fn = self.rmsnorm(f"{p}.final_layernorm", x, scope=p)
        lg = self.linear(f"{p}.lm_head", fn, vocab, h, weight=head_w, path="lm_head", **s)
        self.op(f"{p}.loss", "cross_entropy", lg, targets, path="lm_head", dtype="float32", attrs=ce, **s)
        return x


def lower(spec: Spec) -> Graph:
    """Lower a validated spec to the op graph (no passes run; shapes come from the `shapes` pass)."""
    return _Builder(spec).build()
