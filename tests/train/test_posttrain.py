"""Post-training stages: SFT data and its loss mask, MTP replication between stages, stage resume.

The zero-gradient proof runs the tiny model in float64: the gradient of the SFT loss with respect to the
final hidden state is exactly 0.0 at every position whose label is masked, and changing the tokens of a
trailing user turn (masked, and context for no trained token) leaves every parameter's gradient bitwise
the same, while changing one assistant token does not.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import lmspec
from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import load_tokenizer
from lmspec.spec import load_spec
from lmspec.spec.schema import ServingSpec
from lmspec.train.metrics import read_metrics, without_timing
from lmspec.train.sft import (
    Conversation,
    SFTData,
    SFTStream,
    compile_template,
    encode_conversation,
    read_conversations,
    render_parts,
)
from lmspec.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"
CHAT = ROOT / "examples" / "data" / "chat_tiny.jsonl"
TEMPLATE = ServingSpec().chat_template


def _pipeline(tmp_path: Path, masking: bool = True) -> Path:
    """Pretrain (1 MTP block, 4 steps) then sft (3 blocks, replicated, 3 steps) of the tiny model."""
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""
            extends: {TINY}
            name: pipeline
            training:
              document_masking: {str(masking).lower()}
              stages:
                - {{name: pretrain, tokens: 512, seq_len: 32, batch_size: {{size: 4}},
                   lr: {{kind: constant, peak: 1.0e-3}}, overrides: {{mtp_num_blocks: 1}}}}
                - {{name: sft, kind: sft, data: {CHAT}, tokens: 1152, seq_len: 96, batch_size: {{size: 4}},
                   lr: {{kind: cosine, peak: 5.0e-4, final: 5.0e-5}},
                   overrides: {{mtp_num_blocks: 3, mtp_init: replicate, bias_update: 1.0e-4,
                                seq_aux_coef: 1.0e-6}}}}
            """
        )
    )
    return spec


def _text_data(tmp_path: Path) -> tuple[str, ...]:
    path = tmp_path / "text.jsonl"
    rows = [
        {"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8} for i in range(30)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (str(path),)


def _config(tmp_path: Path, out: str, **kw) -> TrainConfig:
    return TrainConfig(
        spec=_pipeline(tmp_path),
        data=_text_data(tmp_path),
        out=tmp_path / out,
        eval_every=100,
        eval_tokens=256,
        checkpoint_every=100,
        plot=False,
        quiet=True,
        **kw,
    )


# --- rendering and masks ---------------------------------------------------------------------------


def test_default_template_trains_assistant_content_only():
    conv = Conversation("x", (("system", "s"), ("user", "hi"), ("assistant", "yo"), ("user", "bye")))
    parts = render_parts(compile_template(TEMPLATE), conv)
    assert parts == [
        ("<|system|>\ns\n", False),
        ("<|user|>\nhi\n", False),
        ("<|assistant|>\n", False),
        ("yo\n", True),
        ("<|user|>\nbye\n", False),
    ]


def test_a_template_that_is_not_prefix_stable_is_refused():
    conv = Conversation("f.jsonl:3", (("user", "hi"), ("assistant", "yo")))
    bad = compile_template("{% for m in messages|reverse %}{{ m.content }}{% endfor %}")
    with pytest.raises(UsageError, match=r"f.jsonl:3: messages.1: .*not prefixes"):
        render_parts(bad, conv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected at least one conversation, got an empty file"),
        ("{not json\n", ":1: not JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: expected at least one assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', ":1: messages.0.role: expected one of"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', ":1: messages.0.content: expected a string"),
        ('{"prompt": "a"}\n', ":1: expected string fields prompt and completion"),
        ("[1, 2]\n", ":1: expected an object with messages"),
        ('{"text": "plain"}\n', ":1: expected an object with messages, or prompt and completion"),
    ],
)
def test_bad_chat_jsonl_is_one_line(tmp_path, text, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        read_conversations(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_special_chat_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_conversations(tmp_path / "none.jsonl")
    with pytest.raises(UsageError, match="directory"):
        read_conversations(tmp_path)


def test_packing_keeps_conversations_whole_and_masks_everything_but_assistant_tokens():
    tok = load_tokenizer(None)
    data = SFTData(CHAT, tok, TEMPLATE)
    batch = SFTStream(data, masking=True).take_batch(4, 96)
    for row in range(4):
        seg, labels, inputs = batch.segment_ids[row], batch.labels[row], batch.inputs[row]
        trained = labels != -100
        assert trained.any()
        # A trained label belongs to the conversation of its input and is an assistant byte.
        text = bytes(inputs.tolist()).decode()
        assert "<|assistant|>" in text
        assert (batch.position_ids[row][seg != seg.roll(1)] == 0).all()
    # The stream's state is the conversations consumed; a stream restarted there gives the same batch.
    stream = SFTStream(data, masking=True)
    stream.take_batch(2, 96)
    again = SFTStream(data, stream.position, masking=True).take_batch(2, 96)
    assert torch.equal(again.labels, stream.take_batch(2, 96).labels)


# --- the zero-gradient proof -----------------------------------------------------------------------


def _sft_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(batch.inputs, labels=batch.labels, **batch.model_inputs(slice(None), "cpu"))
    # The CE and MTP losses; the sequence-wise balance loss reads every token's routing, masked or not.
    (out.loss + 0.1 * torch.stack(out.mtp_losses).mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_tokens_get_exactly_zero_gradient(tmp_path):
    tok, template = load_tokenizer(None), compile_template(TEMPLATE)
    turns = [("user", "What is 12 + 30?"), ("assistant", "42")]
    convs = [
        Conversation("a", (*turns, ("user", "thanks, bye now"))),
        Conversation("b", (*turns, ("user", "THANKS, BYE NOW"))),  # same length, other bytes
        Conversation("c", (turns[0], ("assistant", "43"), ("user", "thanks, bye now"))),
    ]
    data = SFTData(CHAT, tok, TEMPLATE)
    data.items = [encode_conversation(render_parts(template, c), tok, False) for c in convs]
    width = len(data.items[0][0]) - 1
    batches = [SFTStream(data, i, masking=True).take_batch(1, width) for i in range(3)]
    masked = batches[0].labels[0] == -100
    assert masked.any() and (~masked).any()
    spec = load_spec(TINY)
    # Dense layers for the bitwise comparison: a MoE layer groups tokens by expert, so other tokens' routes
    # change its GEMM shapes and with them the rounding of sums that only add zeros here.
    torch.manual_seed(0)
    model = lmspec.build(load_spec(TINY, ["model.layers=G0*3"]), backend="torch").double()
    # Without MTP blocks (which read h_t as context), d loss / d h_t is exactly 0.0 wherever the label is
    # masked: no CE term reads position t.
    plain = spec.model_copy(update={"model": spec.model.model_copy(update={"mtp": None}), "training": None})
    torch.manual_seed(0)
    no_mtp = lmspec.build(plain, backend="torch").double()
    b = batches[0]
    out = no_mtp(b.inputs, labels=b.labels, **b.model_inputs(slice(None), "cpu"))
    out.hidden.retain_grad()
    out.loss.backward()
    assert out.hidden.grad.dtype == torch.float64
    assert torch.count_nonzero(out.hidden.grad[0][masked]) == 0
    assert torch.count_nonzero(out.hidden.grad[0][~masked]) > 0
    # With all three MTP blocks (trained by this stage): a masked trailing turn is context for no trained token, so its bytes change
    # no bit of any parameter's gradient.
    base = _sft_grads(model, batches[0])
    other = _sft_grads(model, batches[1])
    assert not torch.equal(batches[0].inputs, batches[1].inputs)
    assert base.keys() == other.keys()
    assert all(torch.equal(base[n], other[n]) for n in base)
    # Changing one assistant token does change them (the comparison can fail).
    changed = _sft_grads(model, batches[2])
    assert any(not torch.equal(base[n], changed[n]) for n in base)


# --- the trainer across stages ---------------------------------------------------------------------


def test_replication_copies_block_0_bitwise(tmp_path):
    t = Trainer(_config(tmp_path, "run"))
    t.setup()
    try:
        layers = t.model.model.mtp.layers
        while t.entry.entered < 0 or t.steps < 4:
            t.step()
        before = {n: p.detach().clone() for n, p in layers[0].named_parameters()}
        untouched = {n: p.detach().clone() for n, p in layers[1].named_parameters()}
        t.entry.enter(1)  # what the sft stage's first step does before its forward
        for k in (1, 2):
            for n, p in layers[k].named_parameters():
                assert torch.equal(p, before[n]), (k, n)
        assert any(not torch.equal(untouched[n], before[n]) for n in before)
        row = t.step()
        assert row["stage"] == "sft" and row["stage_kind"] == "sft" and len(row["mtp"]) == 3
        assert 0 < row["target_tokens"] < row["batch_size"] * row["seq_len"]
    finally:
        t.close()


def test_metrics_of_a_pipeline_run(tmp_path):
    result = Trainer(_config(tmp_path, "run")).run()
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["pretrain"] * 4 + ["sft"] * 3
    spec = load_spec(_pipeline(tmp_path))
    n_block = sum(p.numel() for p in lmspec.build(spec, device="meta").model.mtp.layers[1].parameters())
    for r in rows:
        assert len(r["mtp"]) == (1 if r["stage"] == "pretrain" else 3)
        # Blocks 1 and 2 are not run in pre-training: every one of their elements has a zero gradient.
        assert r["num_zeros"] >= (2 * n_block if r["stage"] == "pretrain" else 0)
    assert all(isinstance(r["num_zeros"], int) for r in rows)


def test_resume_across_the_replicating_stage_boundary_is_bitwise(tmp_path):
    whole = Trainer(_config(tmp_path, "whole")).run()
    # The same run, stopped after step 5 (the sft stage's first step, just after replication) and resumed.
    part = Trainer(_config(tmp_path, "part"))
    part.setup()
    try:
        while part.steps < 5:
            row = part.step()
            part.metrics.write(row)
        part.checkpoint()
    finally:
        part.metrics.close()
        part.close()
    resumed = Trainer(_config(tmp_path, "part", resume=True)).run()
    a = without_timing(read_metrics(whole.run_dir / "metrics.jsonl"))
    b = without_timing(read_metrics(resumed.run_dir / "metrics.jsonl"))
    assert a == b
    wa = lmspec.from_pretrained(whole.checkpoint).state_dict()
    wb = lmspec.from_pretrained(resumed.checkpoint).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
