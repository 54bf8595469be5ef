"""Every bound the spec stage puts on its input, in one place.

A spec is small: the full MiMo-V2-Flash spec is 5 KB, 48 layers and a few hundred YAML values.
The bounds below are far above any real model and far below what would make `lmspec check` slow
or large, so a hostile or mistyped input is refused in well under a second and a few MB, with one
`file:line:col` line, instead of being parsed, expanded or compiled.

Loader limits (what is read and parsed):

| constant            | bound         | what it stops                                                   |
|---------------------|---------------|-----------------------------------------------------------------|
| `MAX_FILE_BYTES`    | 128 KiB       | runaway files; also a spec's files together (extends included)  |
|                     |               | and each `--set` value                                          |
| `MAX_YAML_VALUES`   | 20,000        | long lists and alias bombs: nodes are counted while composing,  |
|                     |               | so scanning stops there, then again with aliases expanded       |
| `MAX_NESTING`       | 64 levels     | `[[[[...]]]]` and self-referencing aliases                      |
| `MAX_EXTENDS_DEPTH` | 32 files      | runaway `extends` chains                                        |
| `MAX_PATTERN_CHARS` | 65,536 chars  | huge layer patterns (checked before tokenizing)                 |
| `MAX_LAYERS`        | 1024 layers   | `S*10000000` and 50,000-layer specs (checked while expanding)   |
| `MAX_QUOTE_CHARS`   | 200 chars     | error messages that echo megabytes of input                     |
| `MAX_CONFIG_BYTES`  | 1 MiB         | a transformers `config.json` read by import or `from_pretrained` |

Names: kind, block, stage and spec names match `NAME_PATTERN`, `[A-Za-z_][A-Za-z0-9_]{0,63}` — an
ASCII identifier of at most 64 characters. Names reach generated code, file names, logs and metric
labels; an identifier is safe in each of them.

Semantic maxima (what a spec may ask for; each is above every published open-weight model):

| constant                | bound        |
|-------------------------|--------------|
| `MAX_HIDDEN_SIZE`       | 65,536       |
| `MAX_VOCAB_SIZE`        | 4,194,304    |
| `MAX_POSITIONS`         | 16,777,216   |
| `MAX_HEADS`             | 1024         |
| `MAX_HEAD_DIM`          | 1024         |
| `MAX_INTERMEDIATE_SIZE` | 1,048,576    |
| `MAX_EXPERTS`           | 4096         |
| `MAX_MTP_BLOCKS`        | 16           |
| `MAX_KINDS`             | 256 per map  |
| `MAX_STAGES`            | 64           |
| `MAX_BATCH_SIZE`        | 1,048,576    |
| `MAX_SEED`              | 2**63 - 1    |
| `MAX_STEPS`             | 10**8 steps  |
| `MAX_DEVICES`           | 65,536       |

Bounds tied to other fields live in the schema's validators: a stage's `seq_len` and a sliding
`window` are at most `max_position_embeddings`; `top_k` at most `num_experts`; the stages' token budgets
at most `MAX_STEPS` optimizer steps at their full batch (`tokens: 1e300` is a typo, and `lmspec train`
could not even plan it).
"""

from __future__ import annotations

MAX_FILE_BYTES = 1 << 17
MAX_YAML_VALUES = 20_000
MAX_NESTING = 64
MAX_EXTENDS_DEPTH = 32
MAX_PATTERN_CHARS = 65_536  # 1024 layers of 63-character names, written out
MAX_LAYERS = 1024
MAX_QUOTE_CHARS = 200
MAX_CONFIG_BYTES = 1 << 20  # a transformers config.json (JSON, parsed in C)

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_NAME_CHARS = 64
MAX_KINDS = 256  # entries in each of model.attention, model.ffn and model.blocks
MAX_STAGES = 64
MAX_PATH_CHARS = 4096  # a path or URL a spec names: init_from, teachers, data, prompts
MAX_ROLLOUTS = 1024  # a mopd stage's rollouts_per_prompt

MAX_HIDDEN_SIZE = 65_536
MAX_VOCAB_SIZE = 1 << 22
MAX_POSITIONS = 1 << 24
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_EXPERTS = 4096
MAX_MTP_BLOCKS = 16
MAX_BATCH_SIZE = 1 << 20
MAX_SEED = 2**63 - 1
MAX_STEPS = 10**8  # MiMo-V2-Flash's schedule is about 0.4M steps
MAX_DEVICES = 1 << 16  # each `training.parallel` size, and `lmspec plan --gpus`


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """`text` cut to at most `limit` characters, ending in an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters.

    Large containers are cut before `repr` so quoting never costs more than the limit.
    """
    if isinstance(value, str):
        return clip(repr(value[: limit + 1]), limit)
    if isinstance(value, (list, tuple)) and len(value) > limit:
        value = type(value)(value[:limit])
        return clip(repr(value)[:-1] + ", …" + repr(value)[-1], limit)
    if isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    return clip(repr(value), limit)


def identifier_from(text: str, fallback: str = "imported") -> str:
    """A name that satisfies `NAME_PATTERN`, made from `text` (a folder or file name, say).

    Runs of other characters become `_`, a leading digit gets a `_` before it, and the result is
    cut to `MAX_NAME_CHARS`; an empty result gives `fallback`.
    """
    out = []
    for c in text[: MAX_NAME_CHARS * 4]:
        ok = c.isascii() and (c.isalnum() or c == "_")
        if ok:
            out.append(c)
        elif not out or out[-1] != "_":
            out.append("_")
    name = "".join(out) or fallback
    if name[0].isdigit():
        name = "_" + name
    return name[:MAX_NAME_CHARS]
