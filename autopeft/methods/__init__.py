"""The PEFT method library: one module per method, each registering its MethodSpec under its name."""

from __future__ import annotations

from autopeft.methods import (  # noqa: F401  (imported to register)
    adapter,
    adaptformer,
    bitfit,
    convpass,
    fact_tt,
    full,
    linear,
    ln_tune,
    lora,
    partial,
    prefix,
    ssf,
    vpt_deep,
    vpt_shallow,
)
from autopeft.methods.base import (
    MethodSpec,
    Wrapper,
    get_method,
    list_methods,
    make_spec,
    register,
    size_of,
    spec_from_dict,
)

__all__ = [
    "MethodSpec", "Wrapper", "get_method", "list_methods", "make_spec", "register", "size_of", "spec_from_dict",
]
