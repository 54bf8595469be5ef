"""Files every stage writes or reads the same way: atomic replacement, and what a non-regular file is.

- `write_atomic(path, data)`: readers of `path` see the old content or the new, never a part. The
  cache's generated code, `save_pretrained`'s three files and a run's LATEST all go through it.
- `not_regular(mode)`: a directory, FIFO, device or socket named in words, so a reader can refuse it
  by what it is before opening it (reading `/dev/zero` never ends; opening a FIFO blocks).
- `read_json(path, max_bytes)`: the JSON of a small regular file, every way it can be wrong (not a
  regular file, too large, not UTF-8, not JSON, nested past the parser's recursion limit) one ValueError.

This module imports nothing from lmspec: generated models (through `lmspec.runtime`) use it with the
spec, compiler and codegen packages absent.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["TEMP_PREFIX", "fsync_dir", "not_regular", "read_json", "write_atomic"]

# Temporary files and folders start with this, so a folder's debris from a crash is one glob (`.tmp_*`).
TEMP_PREFIX = ".tmp_"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words (``"a FIFO"``); None for a regular file.

    ``mode`` is an ``st_mode`` from ``os.stat`` (before opening) or ``os.fstat`` (after).
    """
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` (a str as UTF-8) so that readers see the old content or the new.

    The data goes to a hidden temporary file beside ``path`` (``.tmp_<name>.<random>.tmp``, created with
    the umask's permissions), which ``os.replace`` renames over ``path``; a failure removes it and
    re-raises. The folder is created if missing. ``durable`` also fsyncs the file before the rename and
    the folder after it, so the new content survives a power cut, not only a crash of the process.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: a name already taken is an error, never someone else's file written over.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def read_json(path: str | Path, max_bytes: int) -> object:
    """The JSON value in ``path``, a regular file of at most ``max_bytes``.

    ValueError, with a short reason, for a file that is not regular (checked on the open descriptor, and
    the open does not block on a FIFO), larger than ``max_bytes`` (never read past it), not UTF-8, not
    JSON, or nested too deeply for the parser. OSError (FileNotFoundError, ...) propagates.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        what = not_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise ValueError(f"{what}, not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes:,} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise ValueError(f"not JSON ({str(e)[:80]})") from None
