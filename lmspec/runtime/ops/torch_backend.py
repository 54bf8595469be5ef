"""The reference ops under their former module name, for the Triton backend until it imports
``lmspec.runtime.ops.reference`` (and subclasses ``lmspec.runtime.ops.base.Backend``); then this file goes."""

from lmspec.runtime.ops.reference import (  # noqa: F401
    add_rmsnorm,
    attention,
    lm_head_ce,
    moe_experts,
    rmsnorm,
    rope,
    route,
    sort_by_expert,
    swiglu,
    torch,
)
