"""The layer-pattern grammar.

    pattern := item+
    item    := atom ('*' INT)?
    atom    := NAME | '(' pattern ')'

`G0 S*4 G (S*5 G)*7` expands to 48 block names. Whitespace separates items and is otherwise
ignored. Errors carry the 0-based character offset of the offending character so the loader can
point at it in the YAML file.
"""

from __future__ import annotations

import re

# A bound that no real model reaches, so a typo like `S*10000000` is an error, not an out-of-memory.
MAX_LAYERS = 100_000

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)|(?P<int>\d+)|(?P<op>[()*]))")


class PatternError(ValueError):
    """A syntax or reference error in a layer pattern, at character `offset`."""

    def __init__(self, message: str, offset: int, pattern: str) -> None:
        self.offset = offset
        self.pattern = pattern
        caret = " " * offset + "^"
        super().__init__(f"{message} at character {offset + 1}\n    {pattern}\n    {caret}")
        self.short = message


def _tokenize(pattern: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(pattern):
        if pattern[pos:].strip() == "":
            break
        m = _TOKEN.match(pattern, pos)
        if m is None or m.end() == pos:
            bad = pos + len(pattern[pos:]) - len(pattern[pos:].lstrip())
            raise PatternError(
                f"expected a block name, '(', ')', '*' or a count, got {pattern[bad]!r}", bad, pattern
            )
        kind = m.lastgroup or "op"
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, pattern: str, known: set[str] | None) -> None:
        self.pattern = pattern
        self.tokens = _tokenize(pattern)
        self.i = 0
        self.known = known

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _error(self, message: str, offset: int | None = None) -> PatternError:
        if offset is None:
            tok = self._peek()
            offset = tok[2] if tok else len(self.pattern)
        return PatternError(message, offset, self.pattern)

    def parse(self) -> list[str]:
        out = self._sequence(opened_at=None)
        if not out:
            raise self._error("expected at least one block name, got an empty pattern", 0)
        return out

    def _sequence(self, opened_at: int | None) -> list[str]:
        """Items up to the ')' closing the '(' at `opened_at`, or to the end at the top level."""
        out: list[str] = []
        while (tok := self._peek()) is not None:
            if tok[1] == ")":
                if opened_at is None:
                    raise self._error("expected a '(' before this ')', got an unbalanced ')'")
                return out
            out.extend(self._item())
            if len(out) > MAX_LAYERS:
                raise self._error(f"expected at most {MAX_LAYERS} layers, got more", tok[2])
        if opened_at is not None:
            # The unclosed '(' is the character to fix, not the end of the text.
            raise self._error("expected ')' to close this '(', got the end of the pattern", opened_at)
        return out

    def _item(self) -> list[str]:
        kind, text, offset = self.tokens[self.i]
        if kind == "name":
            self.i += 1
            if self.known is not None and text not in self.known:
                raise self._error(f"expected a block name among {sorted(self.known)}, got {text!r}", offset)
            atom = [text]
        elif text == "(":
            self.i += 1
            atom = self._sequence(opened_at=offset)
            if not atom:
                raise self._error("expected block names inside '( )', got an empty group", offset)
            self.i += 1  # the ')'
        else:
            raise self._error(f"expected a block name or '(', got {text!r}", offset)
        tok = self._peek()
        if tok is not None and tok[1] == "*":
            self.i += 1
            count = self._peek()
            if count is None or count[0] != "int":
                got = "the end of the pattern" if count is None else repr(count[1])
                raise self._error(f"expected a repeat count after '*', got {got}")
            self.i += 1
            n = int(count[1])
            if n < 1:
                raise self._error(f"expected a repeat count >= 1, got {n}", count[2])
            if len(atom) * n > MAX_LAYERS:
                raise self._error(
                    f"expected at most {MAX_LAYERS} layers, got {len(atom)} x {n} here", count[2]
                )
            atom = atom * n
        elif tok is not None and tok[0] == "int":
            raise self._error(f"expected '*' before the repeat count, got {tok[1]!r}")
        return atom


def expand_pattern(pattern: str, known: set[str] | None = None) -> list[str]:
    """Expand a layer pattern into one block name per layer; raise PatternError on bad input."""
    return _Parser(pattern, known).parse()


def compress_layers(names: list[str]) -> str:
    """A pattern that expands to `names`: runs of equal names become `name*n`."""
    parts: list[str] = []
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        parts.append(names[i] if j - i == 1 else f"{names[i]}*{j - i}")
        i = j
    return " ".join(parts)
