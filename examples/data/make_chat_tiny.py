"""Write chat_tiny.jsonl: the tiny example's SFT conversations, generated here (no download).

Two tasks with checkable answers in the byte tokenizer: multi-digit addition and string reversal, as
`messages` (with a system turn now and then) and as `prompt`/`completion`. Deterministic: seed 0.

    python examples/data/make_chat_tiny.py    # rewrites examples/data/chat_tiny.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "lantern orbit marble cedar ripple falcon quartz meadow ember willow cobalt tundra".split()


def conversation(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        a, b = rng.randrange(10, 10_000), rng.randrange(10, 10_000)
        question, answer = f"What is {a} + {b}?", str(a + b)
    else:
        word = " ".join(rng.sample(WORDS, rng.randrange(1, 3)))
        question, answer = f"Reverse: {word}", word[::-1]
    if rng.random() < 0.3:
        return {"prompt": question, "completion": answer}
    messages = [{"role": "system", "content": "Answer with the result only."}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).with_name("chat_tiny.jsonl")
    out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(2000)), encoding="utf-8")


if __name__ == "__main__":
    main()
