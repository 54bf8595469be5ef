"""The layer-pattern grammar.

    pattern := item+
    item    := atom ('*' INT)?
    atom    := NAME | '(' pattern ')'

`G0 S*4 G (S*5 G)*7` expands to 48 block names. NAME is an identifier (`[A-Za-z_][A-Za-z0-9_]*`),
INT a decimal count >= 1. Whitespace separates items and is otherwise ignored. Errors carry the
0-based character offset of the offending character so the loader can point at it in the YAML file.

Tokenizing and expanding are linear in the pattern's length. The pattern's length is checked
before tokenizing (`limits.MAX_PATTERN_CHARS`), the layer count while expanding, before any list
beyond `limits.MAX_LAYERS` is built, and parentheses nest at most `limits.MAX_NESTING` deep.
"""

from __future__ import annotations

import re

from lmspec.spec.limits import MAX_LAYERS, MAX_NESTING, MAX_PATTERN_CHARS, quote

# Names are identifiers, as the schema requires of block names (`limits.NAME_PATTERN`).
_TOKEN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>[0-9]+)|(?P<op>[()*])")
_SPACE = re.compile(r"\s*")
_SHOWN = 60  # characters of the pattern shown either side of the offending one


class PatternError(ValueError):
    """A syntax or reference error in a layer pattern, at character `offset`."""

    def __init__(self, message: str, offset: int, pattern: str) -> None:
        self.offset = offset
        self.pattern = pattern
        start = max(0, offset - _SHOWN)
        shown = pattern[start : offset + _SHOWN]
        caret = " " * (offset - start) + "^"
        super().__init__(f"{message} at character {offset + 1}\n    {shown}\n    {caret}")
        self.short = message


def _tokenize(pattern: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset) per token, in one left-to-right pass: linear in the pattern's length."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"expected a pattern of at most {MAX_PATTERN_CHARS} characters, got {len(pattern)}", 0, pattern
        )
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while True:
        pos = _SPACE.match(pattern, pos).end()  # type: ignore[union-attr]  # \s* always matches
        if pos >= len(pattern):
            return tokens
        m = _TOKEN.match(pattern, pos)
        if m is None:
            raise PatternError(
                f"expected a block name, '(', ')', '*' or a count, got {pattern[pos]!r}", pos, pattern
            )
        kind = m.lastgroup or "op"
        tokens.append((kind, m.group(), pos))
        pos = m.end()


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
        out = self._sequence(opened_at=None, depth=0)
        if not out:
            raise self._error("expected at least one block name, got an empty pattern", 0)
        return out

    def _sequence(self, opened_at: int | None, depth: int) -> list[str]:
        """Items up to the ')' closing the '(' at `opened_at`, or to the end at the top level."""
        if depth > MAX_NESTING:
            raise self._error(f"expected at most {MAX_NESTING} nested '(', got more", opened_at)
        out: list[str] = []
        while (tok := self._peek()) is not None:
            if tok[1] == ")":
                if opened_at is None:
                    raise self._error("expected a '(' before this ')', got an unbalanced ')'")
                return out
            out.extend(self._item(depth))
            if len(out) > MAX_LAYERS:
                raise self._error(f"expected at most {MAX_LAYERS} layers, got more", tok[2])
        if opened_at is not None:
            # The unclosed '(' is the character to fix, not the end of the text.
            raise self._error("expected ')' to close this '(', got the end of the pattern", opened_at)
        return out

    def _item(self, depth: int) -> list[str]:
        kind, text, offset = self.tokens[self.i]
        if kind == "name":
            self.i += 1
            if self.known is not None and text not in self.known:
                raise self._error(
                    f"expected a block name among {quote(sorted(self.known))}, got {quote(text)}", offset
                )
            atom = [text]
        elif text == "(":
            self.i += 1
            atom = self._sequence(opened_at=offset, depth=depth + 1)
            if not atom:
                raise self._error("expected block names inside '( )', got an empty group", offset)
            self.i += 1  # the ')'
        else:
            raise self._error(f"expected a block name or '(', got {quote(text)}", offset)
        tok = self._peek()
        if tok is not None and tok[1] == "*":
            self.i += 1
            count = self._peek()
            if count is None or count[0] != "int":
                got = "the end of the pattern" if count is None else quote(count[1])
                raise self._error(f"expected a repeat count after '*', got {got}")
            self.i += 1
            if len(count[1]) > 9:  # before int(): a 5000-digit count is an error, not a ValueError
                raise self._error(
                    f"expected a repeat count of at most {MAX_LAYERS} layers, got {quote(count[1])}", count[2]
                )
            n = int(count[1])
            if n < 1:
                raise self._error(f"expected a repeat count >= 1, got {n}", count[2])
            if len(atom) * n > MAX_LAYERS:
                raise self._error(
                    f"expected at most {MAX_LAYERS} layers, got {len(atom)} x {n} here", count[2]
                )
            atom = atom * n
        elif tok is not None and tok[0] == "int":
            raise self._error(f"expected '*' before the repeat count, got {quote(tok[1])}")
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
