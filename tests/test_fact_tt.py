"""FacT-TT's batched forward and delta_weight against the per-piece formula they replace.

The reference below is the original implementation: a zero tensor of the layer's full output, to which each d × d
piece adds U · core · V applied to its input slice. The method's count, identity, training, save/load and merge
invariants are in tests/test_methods.py; the cases here use trained-looking weights (U not zero).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from test_methods import SWIN, VIT, VIT_REG, _base, _inputs, _plan

from autopeft.backbones import backbone_spec
from autopeft.methods.base import unwrap
from autopeft.methods.fact_tt import FactLinear
from autopeft.plan import merge_model


def reference_forward(layer: FactLinear, x: torch.Tensor) -> torch.Tensor:
    f = layer._factors[0]
    d = f.fact_u.shape[0]
    delta = x.new_zeros(*x.shape[:-1], layer.out_features)
    for core, (o, i) in zip(layer.fact_cores, layer.pieces, strict=True):
        delta[..., o : o + d] += ((x[..., i : i + d] @ f.fact_v.t()) @ core.t()) @ f.fact_u.t()
    return layer.base(x) + layer.scale * delta


def reference_delta_weight(layer: FactLinear) -> torch.Tensor:
    f = layer._factors[0]
    d = f.fact_u.shape[0]
    linear: Any = unwrap(layer)  # the timm Linear
    delta = torch.zeros_like(linear.weight)
    for core, (o, i) in zip(layer.fact_cores, layer.pieces, strict=True):
        delta[o : o + d, i : i + d] += layer.scale * (f.fact_u @ core @ f.fact_v)
    return delta


def _trained_looking(name: str, options: dict, blocks: list[int] | None = None) -> torch.nn.Module:
    """A FacT-TT model whose U, V and cores are all random and non-zero, as after training."""
    spec = backbone_spec(name)
    model = _plan("fact_tt", options, blocks, spec.num_blocks).apply(_base(name), spec)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "fact_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert all(p.abs().min() > 0 for n, p in model.named_parameters() if n.endswith("fact_u"))
    return model


# each target alone, all six, and qkv targets out of order (cores permuted on the grid) or leaving slices out (a
# zero core in the grid)
TARGETS = ["q", "k", "v", "proj", "fc1", "fc2", "q,k,v,proj,fc1,fc2", "v,k,q", "v,q", "fc2,k,fc1"]


@pytest.mark.parametrize("name", [VIT, VIT_REG, SWIN])
@pytest.mark.parametrize("targets", TARGETS)
def test_forward_and_delta_weight_match_the_per_piece_formula(name: str, targets: str) -> None:
    model = _trained_looking(name, {"rank": 3, "scale": 0.7, "targets": targets})
    layers = [m for m in model.modules() if isinstance(m, FactLinear)]
    assert layers
    g = torch.Generator().manual_seed(5)
    for layer in layers:
        x = torch.randn(2, 7, layer.in_features, generator=g)
        new, old = layer(x), reference_forward(layer, x)
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
        # the same gradients reach the cores, the shared factors and the input
        x.requires_grad_(True)
        grad_out = torch.randn(new.shape, generator=g)
        params = [layer.fact_cores, layer._factors[0].fact_u, layer._factors[0].fact_v, x]
        new_grads = torch.autograd.grad(layer(x), params, grad_out)
        old_grads = torch.autograd.grad(reference_forward(layer, x), params, grad_out)
        for a, b in zip(new_grads, old_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), reference_delta_weight(layer), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("targets", TARGETS)
def test_merged_logits_equal_unmerged(targets: str) -> None:
    model = _trained_looking(VIT, {"rank": 3, "scale": 0.7, "targets": targets}, blocks=[0, 2]).eval()
    x, _ = _inputs(VIT)
    with torch.no_grad():
        unmerged = model(x)
        # the whole model against the per-piece formula: every FactLinear of a copy runs the reference
        reference = copy.deepcopy(model)
        for layer in reference.modules():
            if isinstance(layer, FactLinear):
                layer.forward = functools.partial(reference_forward, layer)  # type: ignore[method-assign]
        torch.testing.assert_close(reference(x), unmerged, atol=1e-6, rtol=1e-6)
        merged = merge_model(copy.deepcopy(model))
        assert not any(isinstance(m, FactLinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)
