"""Spec stage: schema, YAML loading with source positions, the pattern grammar, composition."""

from lmspec.errors import SpecError
from lmspec.spec.loader import dump_spec, load, load_spec, loads_spec, spec_hash, spec_to_data
from lmspec.spec.pattern import PatternError, compress_layers, expand_pattern
from lmspec.spec.schema import (
    MTP,
    AttentionKind,
    Block,
    DenseFFN,
    FFNKind,
    GlobalAttention,
    LRSchedule,
    ModelSpec,
    MoEFFN,
    SlidingAttention,
    Spec,
    Stage,
    TrainingSpec,
)

__all__ = [
    "MTP",
    "AttentionKind",
    "Block",
    "DenseFFN",
    "FFNKind",
    "GlobalAttention",
    "LRSchedule",
    "MoEFFN",
    "ModelSpec",
    "PatternError",
    "SlidingAttention",
    "Spec",
    "SpecError",
    "Stage",
    "TrainingSpec",
    "compress_layers",
    "dump_spec",
    "expand_pattern",
    "load",
    "load_spec",
    "loads_spec",
    "spec_hash",
    "spec_to_data",
]
