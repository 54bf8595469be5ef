"""Compiler stage: lower a Spec to a graph IR and run passes over it."""

from lmspec.compiler.graph import Graph, LayerInfo
from lmspec.compiler.lower import lower, run_passes

__all__ = ["Graph", "LayerInfo", "lower", "run_passes"]
