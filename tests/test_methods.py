"""Invariants of every PEFT method, table-driven over method × options × backbone family.

For each case: closed-form count == actual trainable count; identity at initialisation where the method says so;
only plan parameters and the head train and every one of them gets a gradient; mergeable plans merge into a plain
timm model with the same logits; adapters saved to safetensors reload into a fresh backbone with identical logits.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from autopeft.backbones import BackboneSpec, backbone_spec, create_backbone, is_head_param
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.features import prefix_forward, suffix_forward, supports_cache
from autopeft.methods import Wrapper, list_methods, make_spec, size_of
from autopeft.plan import PeftPlan, load_adapter, merge_model, save_adapter

VIT, VIT_REG, SWIN = "autopeft_test_vit", "autopeft_test_vit_reg", "autopeft_test_swin"
NUM_CLASSES = 5

# (method, options, blocks or None for all)
CASES = [
    ("full", {}, None),
    ("linear", {}, None),
    ("bitfit", {}, None),
    ("bitfit", {}, [1]),
    ("ln_tune", {}, None),
    ("partial", {"k": 2}, None),
    ("lora", {}, None),
    ("lora", {"rank": 2, "alpha": 3, "targets": "q,k,v,proj,fc1,fc2"}, None),
    ("lora", {"rank": 3, "targets": "k"}, [0, 2]),
    ("ssf", {}, None),
    ("ssf", {"init": "identity"}, None),
    ("ssf", {"init": "identity"}, [1, 2]),
    ("ssf", {"init": "normal"}, [0]),
    ("fact_tt", {}, None),
    ("fact_tt", {"rank": 2, "scale": 0.5, "targets": "q,proj,fc1,fc2"}, [0, 1]),
    ("adapter", {}, None),
    ("adapter", {"dim": 4, "position": "both"}, [1, 2]),
    ("adapter", {"dim": 3, "position": "attn"}, None),
    ("adaptformer", {"dim": 4, "scale": 0.5}, None),
    ("adaptformer", {"dim": 3, "input": "residual"}, [0, 2]),
    ("convpass", {"dim": 4}, None),
    ("vpt_shallow", {"length": 3}, None),
    ("vpt_deep", {"length": 2}, None),
    ("vpt_deep", {"length": 4}, [2]),
    ("prefix", {"length": 3}, None),
]

MIXED = {
    # the issue's example, scaled to 3 blocks: LoRA early, AdaptFormer late, VPT-deep on the last
    "lora+adaptformer+vpt": {
        "blocks": {"0": [{"method": "lora", "rank": 4}], "1": [{"method": "lora", "rank": 4}],
                   "2": [{"method": "adaptformer", "dim": 4}, {"method": "vpt_deep", "length": 2}]},
    },
    # everything that merges, stacked on the same linears
    "mergeable-stack": {
        "blocks": {str(i): [{"method": "lora", "rank": 2, "targets": ["q", "v", "fc1"]},
                            {"method": "ssf", "init": "identity"},
                            {"method": "fact_tt", "rank": 2}, {"method": "bitfit"}, {"method": "ln_tune"}]
                   for i in range(3)},
    },
    # every wrapper on one block, plus shallow prompts that travel through the deep-prompted blocks
    "all-on-one-block": {
        "blocks": {"0": [{"method": "prefix", "length": 2}, {"method": "adapter", "position": "both", "dim": 2},
                         {"method": "convpass", "dim": 2}, {"method": "vpt_deep", "length": 2},
                         {"method": "lora", "targets": ["q", "proj"]}, {"method": "ssf", "init": "identity"},
                         {"method": "adaptformer", "dim": 2, "input": "residual"}],
                   "2": [{"method": "vpt_deep", "length": 1}, {"method": "adaptformer"}]},
        "global": [{"method": "vpt_shallow", "length": 2}],
    },
    "partial+lora": {"blocks": {"0": [{"method": "lora"}]}, "global": [{"method": "partial", "k": 1}]},
    # overlapping unfreezing: the last block is fully trained and also listed for BitFit and LN-tune
    "partial+bitfit+ln_tune": {
        "blocks": {"1": [{"method": "bitfit"}], "2": [{"method": "bitfit"}, {"method": "ln_tune"}]},
        "global": [{"method": "partial", "k": 1}],
    },
}


def _plan(method: str, options: dict, blocks, num_blocks: int) -> PeftPlan:
    return PeftPlan.single(make_spec(method, options), range(num_blocks) if blocks is None else blocks)


def _cases():
    for family_model in (VIT, VIT_REG, SWIN):
        spec = backbone_spec(family_model)
        for method, options, blocks in CASES:
            if spec.family not in make_spec(method, options).families:
                continue
            blocks = None if blocks is None else [b for b in blocks if b < spec.num_blocks]
            yield pytest.param(family_model, _plan(method, options, blocks, spec.num_blocks),
                               id=f"{family_model}-{method}-{'-'.join(f'{k}{v}' for k, v in options.items())}-{blocks}")
    for name, data in MIXED.items():
        yield pytest.param(VIT, PeftPlan.from_dict(data), id=f"{VIT}-mixed-{name}")
        yield pytest.param(VIT_REG, PeftPlan.from_dict(data), id=f"{VIT_REG}-mixed-{name}")


def _base(name: str) -> torch.nn.Module:
    torch.manual_seed(123)  # the same "pretrained" weights every time
    return create_backbone(name, num_classes=NUM_CLASSES).eval()


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    size = backbone_spec(name).input_size
    return torch.randn(6, *size, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name,plan", list(_cases()))
def test_method_invariants(name: str, plan: PeftPlan, tmp_path) -> None:
    check_invariants(lambda: _base(name), backbone_spec(name), plan, *_inputs(name), tmp_path)


def check_invariants(make_base: Callable[[], torch.nn.Module], spec: BackboneSpec, plan: PeftPlan, x: torch.Tensor,
                     y: torch.Tensor, tmp_path: Path) -> None:
    """Every invariant of `plan` on the backbone `make_base()` builds (the same weights each call, in eval mode).

    Closed-form count; identity at initialisation; only plan parameters and the head train, each with a gradient;
    cached frozen prefix + suffix == the model; the adapter reloads; a plan that merges on `spec` merges into a plain
    timm model with the same logits, one that does not (`PeftPlan.merge_blockers`) refuses to."""
    plain = make_base()
    with torch.no_grad():
        plain_logits = plain(x)
    model = plan.apply(copy.deepcopy(plain), spec)

    # closed-form count == actual trainable count, head excluded
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert plan.count(spec) == sum(p.numel() for n, p in trainable.items() if not is_head_param(n))
    assert all(p.requires_grad for n, p in model.named_parameters() if is_head_param(n))

    # identity at initialisation
    if all(s.identity_at_init for s in plan.methods()):
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain_logits, atol=1e-6, rtol=0)

    # training moves every trainable parameter, nothing else, and no branch is dead
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, x, y, steps=3)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, f"{n}: changed={changed} requires_grad={p.requires_grad}"
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    dead = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"

    with torch.no_grad():
        adapted_logits = model(x)

    # the frozen prefix's features, cached, then the rest of the model: the same logits
    k = min(plan.frozen_prefix(spec), spec.num_blocks) if supports_cache(model) else 0
    if k > 0:
        with torch.no_grad():
            torch.testing.assert_close(suffix_forward(model, prefix_forward(model, x, k), k), adapted_logits,
                                       atol=1e-5, rtol=1e-5)

    # save plan parameters + head; reload into a fresh backbone with the same plan
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = plan.apply(make_base(), spec)
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted_logits, atol=1e-6, rtol=0)

    # merge into a plain timm model
    if not plan.mergeable:
        with pytest.raises(AutopeftError, match="cannot be merged"):
            merge_model(model)
        return
    if plan.merge_blockers(spec):  # e.g. SSF where qkv has no bias to absorb the shift
        with pytest.raises(AutopeftError, match="without weight and bias"):
            merge_model(model)
        return
    merge_model(model)
    assert not any(isinstance(m, Wrapper) for m in model.modules())
    target = make_base()
    assert set(model.state_dict()) == set(target.state_dict())
    target.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(x), adapted_logits, atol=1e-4, rtol=1e-4)


def test_every_method_is_covered() -> None:
    assert {m for m, _, _ in CASES} == {cls.name for cls in list_methods()}


@pytest.mark.parametrize("method", ["convpass", "vpt_shallow", "vpt_deep", "prefix"])
def test_swin_rejects_token_methods(method: str) -> None:
    spec = backbone_spec(SWIN)
    plan = PeftPlan.single(make_spec(method), range(spec.num_blocks))
    with pytest.raises(UnsupportedBackbone, match="does not support swin"):
        plan.count(spec)
    with pytest.raises(AutopeftError, match="does not support swin"):
        plan.apply(_base(SWIN), spec)


def test_lora_updates_only_chosen_qkv_slices() -> None:
    spec = backbone_spec(VIT)
    model = PeftPlan.single(make_spec("lora", {"targets": "v"}), [0]).apply(_base(VIT), spec)
    x, y = _inputs(VIT)
    _train(model, x, y, steps=2)
    qkv = model.blocks[0].attn.qkv
    delta = qkv.delta_weight()
    d = spec.dims[0]
    assert delta[: 2 * d].abs().sum() == 0 and delta[2 * d :].abs().sum() > 0


def test_lora_scale_is_float() -> None:
    assert make_spec("lora", {"rank": 8, "alpha": 4}).scale == 0.5
    assert make_spec("lora", {"rank": 3, "alpha": 2}).scale == pytest.approx(2 / 3)
    assert make_spec("lora", {"rank": 4}).scale == 1.0


def test_vpt_keeps_sequence_length_for_the_head() -> None:
    spec = backbone_spec(VIT_REG)  # average pooling: prompts left in the sequence would change the pooled features
    plan = PeftPlan.from_dict(MIXED["all-on-one-block"])
    model = plan.apply(_base(VIT_REG), spec)
    x, _ = _inputs(VIT_REG)
    feats = model.forward_features(x)
    assert feats.shape[1] == spec.num_patches + spec.num_prefix_tokens


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("lora", {"rank": 0}, "rank must be a positive integer"),
        ("lora", {"targets": "q,x"}, "unknown target"),
        ("lora", {"targets": ""}, "at least one"),
        ("lora", {"rank": "abc"}, "must be int"),
        ("adapter", {"position": "middle"}, "position must be one of"),
        ("vpt_deep", {"length": -1}, "length must be a positive integer"),
        ("partial", {"k": 0}, "k must be a positive integer"),
        ("ssf", {"init": "zeros"}, "init must be"),
        ("adaptformer", {"scale": 0}, "scale must be > 0"),
        ("lora", {"rnak": 3}, "unknown option"),
        ("nope", {}, "unknown method 'nope'"),
    ],
)
def test_spec_validation(method: str, options: dict, message: str) -> None:
    with pytest.raises(AutopeftError, match=message):
        make_spec(method, options)


def test_partial_k_larger_than_depth() -> None:
    spec = backbone_spec(VIT)
    with pytest.raises(UnsupportedBackbone, match="exceeds"):
        PeftPlan.single(make_spec("partial", {"k": 9}), []).count(spec)


def test_fact_tt_mlp_width_must_divide() -> None:
    spec = dataclasses.replace(backbone_spec(VIT), mlp_hidden=(50, 50, 50))
    with pytest.raises(UnsupportedBackbone, match="divisible"):
        make_spec("fact_tt", {"targets": "q,fc1"}).check(spec, [0])
    make_spec("fact_tt", {"targets": "q,v"}).check(spec, [0])  # attention-only targets fit any MLP width


SIZE_OPTIONS = {"lora": "rank", "fact_tt": "rank", "adapter": "dim", "adaptformer": "dim", "convpass": "dim",
                "vpt_shallow": "length", "vpt_deep": "length", "prefix": "length", "partial": "k"}


@pytest.mark.parametrize("cls", list_methods(), ids=lambda c: c.name)
def test_size_option(cls: type) -> None:
    assert cls.size_option == SIZE_OPTIONS.get(cls.name)
    spec = make_spec(cls.name)
    if cls.size_option is None:
        assert spec.size is None and size_of(spec.to_dict()) is None
        return
    # the size option is an integer field, and the size follows it
    assert isinstance(getattr(spec, cls.size_option), int)
    bigger = make_spec(cls.name, {cls.size_option: getattr(spec, cls.size_option) + 2})
    assert bigger.size == spec.size + 2 == size_of(bigger.to_dict())
    assert size_of({"method": cls.name}) == spec.size  # left out: the default


def test_size_of_does_not_take_the_first_integer() -> None:
    # a hypothetical entry whose first integer option is not the size must still read the size option
    assert size_of({"method": "lora", "alpha": 16, "rank": 2}) == 2
    assert size_of({"method": "ssf", "init": "normal"}) is None
    assert size_of({"method": "no-such-method", "rank": 3}) is None
    assert size_of({"method": "lora", "rank": "4"}) is None


def test_ssf_ends_follow_the_first_and_last_block() -> None:
    spec = backbone_spec(VIT)
    d = spec.dims[0]
    inner = make_spec("ssf").count(spec, [1])
    assert make_spec("ssf").count(spec, [0]) == inner + 2 * d  # the patch embedding with block 0
    assert make_spec("ssf").count(spec, [2]) == inner + 2 * d  # the final norm with the last block
    assert make_spec("ssf").first_block(spec, [0, 1]) == -1 and make_spec("ssf").first_block(spec, [1, 2]) == 1
    model = PeftPlan.single(make_spec("ssf"), [1]).apply(_base(VIT), spec)
    assert not isinstance(model.patch_embed.proj, Wrapper) and not isinstance(model.norm, Wrapper)


@pytest.mark.parametrize("targets", ["q", "v,q", "q,k,v", "k,proj,fc2", "fc1"])
def test_lora_forward_is_the_base_plus_the_delta_weight(targets: str) -> None:
    # every target's product in one: the forward against the per-slice delta_weight on trained-looking weights
    spec = backbone_spec(VIT)
    model = PeftPlan.single(make_spec("lora", {"rank": 3, "alpha": 5, "targets": targets}), [0]).apply(_base(VIT), spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    wrappers: list[Any] = [m for m in model.modules() if isinstance(m, Wrapper)]
    assert wrappers
    for w in wrappers:
        linear: Any = w.base
        x = torch.randn(2, 5, linear.in_features, generator=g)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, linear.weight + w.delta_weight(), linear.bias)
            torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=1e-5)


def test_convpass_forward_is_the_base_plus_the_scaled_bypass() -> None:
    # the up-projection, bias, scale and residual fused into one product: against the unfused formula on
    # trained-looking weights (up not zero), with the class token through the convolution's centre tap
    from autopeft.methods.convpass import ConvBypass, quick_gelu

    spec = backbone_spec(VIT)
    model = PeftPlan.single(make_spec("convpass", {"dim": 3, "scale": 2.5}), [1]).apply(_base(VIT), spec)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not is_head_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    wrappers: list[Any] = [m for m in model.modules() if isinstance(m, ConvBypass)]
    assert len(wrappers) == 2
    gh, gw = spec.grid
    for w in wrappers:
        x = torch.randn(2, gh * gw + 1, spec.dims[1], generator=g)
        z = quick_gelu(w.down(x))
        grid = w.conv(z[:, 1:].transpose(1, 2).reshape(2, -1, gh, gw)).flatten(2).transpose(1, 2)
        tokens = torch.nn.functional.linear(z[:, :1], w.conv.weight[:, :, 1, 1], w.conv.bias)
        expected = w.base(x) + 2.5 * w.up(quick_gelu(torch.cat([tokens, grid], dim=1)))
        with torch.no_grad():
            torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=1e-5)
