"""lmspec: a declarative model-spec compiler for large language models.

``lmspec.load_spec``, ``lmspec.build`` and ``lmspec.from_pretrained`` are imported lazily so that
``import lmspec.spec`` stays free of torch and jinja2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "build", "from_pretrained", "load_spec"]

if TYPE_CHECKING:
    from lmspec.runtime.modeling import build, from_pretrained
    from lmspec.spec import load_spec


def __getattr__(name: str) -> Any:
    if name == "load_spec":
        from lmspec.spec import load_spec

        return load_spec
    if name in ("build", "from_pretrained"):
        from lmspec.runtime import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'lmspec' has no attribute {name!r}")
