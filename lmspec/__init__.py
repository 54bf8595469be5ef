"""lmspec: a declarative model-spec compiler for large language models."""

__version__ = "0.1.0"
