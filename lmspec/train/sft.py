"""Supervised fine-tuning data: chat JSONL rendered with the spec's chat template, loss on assistant tokens.

A `sft` stage's `data` is a JSONL file with one conversation per line, either
`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}` (roles
system, developer, user, assistant, tool) or `{"prompt": "...", "completion": "..."}` (read as one user turn and
one assistant turn). Every conversation needs an assistant turn.

Rendering. The conversation goes through `serving.chat_template` — the same template the server renders
prompts with, so a model is trained on the format it is served in — with `messages` and
`add_generation_prompt`. Message k's text is what rendering `messages[: k + 1]` adds to rendering
`messages[:k]`; for an assistant message, the part that rendering `messages[:k]` with
`add_generation_prompt=True` adds first is its header (a prompt, not trained) and the rest — its content and
whatever the template closes it with — is trained. The default template (for the byte tokenizer),

    {% for m in messages %}<|{{ m.role }}|>\\n{{ m.content }}\\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\\n{% endif %}

trains `content + "\\n"` of each assistant turn and nothing else. A template whose renderings are not
prefixes of each other cannot be split this way and is refused. Each part is tokenized on its own and the
tokens concatenated (with the tokenizer's end-of-text token after the conversation, trained when the last
turn is the assistant's), so the mask is exact for any tokenizer.

Packing. `SFTStream` fills each row of `seq_len + 1` tokens with whole conversations in order (a
conversation that does not fit starts the next row; one longer than a row is cut to the row); the rest of a
row is padding, never trained. A label is trained only where its token is an assistant token of the same
conversation as the input before it. With `training.document_masking` each conversation is its own document
(`segment_ids`, `position_ids` from 0), so packed conversations do not see each other. The stream's state
is one integer, the conversations consumed, so a checkpoint resumes it exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np
import torch

from lmspec.errors import UsageError
from lmspec.runtime.tokenizer import Tokenizer
from lmspec.train.data import Batch, document_positions, jsonl_rows, regular_file_problem

IGNORE_INDEX = -100
ROLES = ("system", "developer", "user", "assistant", "tool")
# A chat file is read whole into memory; this keeps a wrong path (a corpus dump) from exhausting it.
MAX_SFT_BYTES = 1 << 30


@dataclass(frozen=True)
class Conversation:
    name: str  # path:line
    messages: tuple[tuple[str, str], ...]  # (role, content)


def _message(where: str, i: int, m: object) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise UsageError(
            f"{where}: messages.{i}: expected an object with role and content, got {type(m).__name__}"
        )
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise UsageError(
            f"{where}: messages.{i}.role: expected one of {', '.join(ROLES)}, got {str(role)[:40]!r}"
        )
    if not isinstance(content, str):
        raise UsageError(f"{where}: messages.{i}.content: expected a string, got {type(content).__name__}")
    return role, content


def _conversation(where: str, row: object) -> Conversation:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected an object with messages, or prompt and completion")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UsageError(f"{where}: messages: expected a non-empty list of {{role, content}}")
        messages = tuple(_message(where, i, m) for i, m in enumerate(msgs))
    elif "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UsageError(f"{where}: expected string fields prompt and completion")
        messages = (("user", prompt), ("assistant", completion))
    else:
        raise UsageError(f"{where}: expected an object with messages, or prompt and completion")
    if not any(role == "assistant" for role, _ in messages):
        raise UsageError(
            f"{where}: expected at least one assistant turn (the loss is on assistant tokens), got none"
        )
    return Conversation(where, messages)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a chat JSONL file; UsageError (one line, `path:line: ...`) on the first bad one."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise UsageError(f"{path}: expected a chat JSONL file, got {problem}")
    if Path(path).stat().st_size > MAX_SFT_BYTES:
        raise UsageError(f"{path}: expected a chat JSONL file of at most {MAX_SFT_BYTES} bytes")
    out = []
    try:
        for n, row in jsonl_rows(path, errors="strict"):
            out.append(_conversation(f"{path}:{n}", row))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: expected UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or type(e).__name__}") from None
    if not out:
        raise UsageError(f"{path}: expected at least one conversation, got an empty file")
    return out


def compile_template(source: str) -> jinja2.Template:
    """The chat template, sandboxed (a spec's template never runs code) and strict about undefined names."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise UsageError(f"serving.chat_template: not a Jinja2 template ({str(e)[:80]})") from None


def render_parts(template: jinja2.Template, conv: Conversation) -> list[tuple[str, bool]]:
    """The conversation's text in parts, each with whether it is trained (see the module doc)."""
    msgs = [{"role": r, "content": c} for r, c in conv.messages]

    def render(k: int, generation: bool) -> str:
        try:
            return template.render(messages=msgs[:k], add_generation_prompt=generation)
        except jinja2.TemplateError as e:
            raise UsageError(f"{conv.name}: the chat template failed ({str(e)[:80]})") from None

    def refuse(k: int) -> UsageError:
        return UsageError(
            f"{conv.name}: messages.{k}: serving.chat_template renders conversations that are not prefixes of "
            "each other, so the assistant tokens cannot be found (render `add_generation_prompt` as the header)"
        )

    parts: list[tuple[str, bool]] = []
    before = render(0, False)
    if before:
        parts.append((before, False))
    for k, (role, _) in enumerate(conv.messages):
        after = render(k + 1, False)
        if not after.startswith(before):
            raise refuse(k)
        if role == "assistant":
            header = render(k, True)
            if not (header.startswith(before) and after.startswith(header)):
                raise refuse(k)
            parts += [(header[len(before) :], False), (after[len(header) :], True)]
        else:
            parts.append((after[len(before) :], False))
        before = after
    return [(text, trained) for text, trained in parts if text]


def render_prompt(template: jinja2.Template, text: str) -> str:
    """`text` as one user turn with the assistant's header after it: what the server's chat endpoint sends
    the model for that message, and what an sft stage trained the model to answer."""
    try:
        return template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise UsageError(f"serving.chat_template: failed on a prompt ({str(e)[:80]})") from None


def encode_conversation(
    parts: list[tuple[str, bool]], tokenizer: Tokenizer, last_is_assistant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, trained) int64 / bool arrays of one rendered conversation, end-of-text appended if any."""
    tokens, trained = [], []
    for text, is_trained in parts:
        ids = tokenizer.encode(text)
        tokens += ids
        trained += [is_trained] * len(ids)
    if tokenizer.eos_id is not None:
        tokens.append(tokenizer.eos_id)
        trained.append(last_is_assistant)  # the model learns to stop after its own last turn
    return np.asarray(tokens, dtype=np.int64), np.asarray(trained, dtype=bool)


class SFTData:
    """A chat file's conversations as token arrays, in an order shuffled once by the run's seed."""

    def __init__(
        self, path: str | Path, tokenizer: Tokenizer, template_source: str, *, seed: int = 0
    ) -> None:
        convs = read_conversations(path)
        template = compile_template(template_source)
        order = np.random.default_rng(seed).permutation(len(convs))
        self.path = str(path)
        self.items: list[tuple[np.ndarray, np.ndarray]] = []
        h = hashlib.sha256(template_source.encode())
        for i in order:
            c = convs[i]
            tokens, trained = encode_conversation(
                render_parts(template, c), tokenizer, c.messages[-1][0] == "assistant"
            )
            self.items.append((tokens, trained))
            h.update(tokens.tobytes())
            h.update(trained.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def describe(self) -> str:
        n_tok = sum(len(t) for t, _ in self.items)
        n_trained = sum(int(m.sum()) for _, m in self.items)
        return f"{self.path}: {len(self.items)} conversations, {n_tok:,} tokens ({n_trained:,} trained)"


class SFTStream:
    """Rows of whole conversations from `SFTData` (see the module doc); `position` is its whole state."""

    def __init__(self, data: SFTData, position: int = 0, *, masking: bool = False) -> None:
        self.data = data
        self.position = int(position)
        self.masking = masking

    def _row(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = np.zeros(width, dtype=np.int64)
        trained = np.zeros(width, dtype=bool)
        segments = np.full(width, -1, dtype=np.int64)  # padding: a document of its own
        used = 0
        while True:
            toks, mask = self.data.items[self.position % len(self.data.items)]
            if used and used + len(toks) > width:
                break
            n = min(len(toks), width - used)  # a conversation longer than the row is cut to it
            tokens[used : used + n], trained[used : used + n] = toks[:n], mask[:n]
            segments[used : used + n] = self.position
            used += n
            self.position += 1
            if used >= width:
                break
        return tokens, trained, segments

    def take_batch(self, batch_size: int, seq_len: int, stage: str | None = None) -> Batch:
        rows = [self._row(seq_len + 1) for _ in range(batch_size)]
        tokens = np.stack([r[0] for r in rows])  # (B, L + 1)
        trained = np.stack([r[1] for r in rows])
        segments = np.stack([r[2] for r in rows])
        same = segments[:, 1:] == segments[:, :-1]  # a label of the conversation its input belongs to
        labels = np.where(trained[:, 1:] & same, tokens[:, 1:], IGNORE_INDEX)
        inputs = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))
        out_labels = torch.from_numpy(np.ascontiguousarray(labels))
        if not self.masking:
            return Batch(inputs, out_labels)
        seg = np.ascontiguousarray(segments[:, :-1])
        return Batch(
            inputs,
            out_labels,
            position_ids=torch.from_numpy(document_positions(seg)),
            segment_ids=torch.from_numpy(seg),
        )


class StagedStream:
    """The run's text stream for pretrain stages and one `SFTStream` per sft stage, chosen by stage name.

    Its `position` (JSON) holds every stream's, so a checkpoint resumes each where it was.
    """

    def __init__(self, text, sft: dict[str, SFTStream]) -> None:
        self.text = text
        self.sft = sft

    @staticmethod
    def split_position(position: object) -> tuple[object, dict[str, int]]:
        """(the text stream's position, each sft stream's) from a checkpoint's data position."""
        if isinstance(position, dict) and "text" in position:
            sft = position.get("sft")
            return position["text"], {str(k): int(v) for k, v in (sft or {}).items()}
        return 0, {}

    @property
    def position(self) -> dict[str, object]:
        return {"text": self.text.position, "sft": {name: s.position for name, s in self.sft.items()}}

    def take_batch(self, batch_size: int, seq_len: int, stage: str | None = None) -> Batch:
        stream = self.sft.get(stage or "")
        if stream is not None:
            return stream.take_batch(batch_size, seq_len, stage)
        return self.text.take_batch(batch_size, seq_len, stage)
