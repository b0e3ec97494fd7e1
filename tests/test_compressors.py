"""Visual-token compressors: shapes, gradients, locality, query use, FLOP formulas, budgets.

Small widths (vision 16, LLM 24) on an 8 x 8 grid keep the whole file to a few seconds on one
core; one shape-only sweep runs CLIP-L's 24 x 24 grid over the paper's budget list.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenscale import compressors

torch.set_num_threads(1)

VISION, LLM, P = 16, 24, 64
REGION_BASED = ("quecc", "tokenpacker")
PAPER_BUDGETS = (1, 4, 16, 36, 64, 144, 576)


def make(name: str, visual_tokens: int, grid_tokens: int = P, seed: int = 0) -> compressors.Compressor:
    torch.manual_seed(seed)
    return compressors.build(
        name, vision_dim=VISION, llm_dim=LLM, grid_tokens=grid_tokens, visual_tokens=visual_tokens
    )


def inputs(batch: int = 2, grid_tokens: int = P, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid_tokens, VISION, generator=gen), torch.randn(batch, LLM, generator=gen)


def run(module: compressors.Compressor, patches: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    # the worker's contract: the query is passed only to compressors that declare they use it
    return module(patches, query if module.uses_query else None)


ALL_CASES = [(name, v) for name in compressors.names() for v in compressors.valid_budgets(name, P)]


# --- shapes and gradients -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "visual_tokens"), ALL_CASES)
def test_shape_and_gradients(name: str, visual_tokens: int) -> None:
    module = make(name, visual_tokens)
    patches, query = inputs()
    patches.requires_grad_(True)
    out = run(module, patches, query)
    assert out.shape == (2, visual_tokens, LLM)
    assert torch.isfinite(out).all()

    # a random readout, so no symmetry can cancel a parameter's gradient
    (out * torch.randn_like(out)).sum().backward()
    assert patches.grad is not None and patches.grad.abs().sum() > 0
    # With one patch per region (V = P) a region query attends to a single key: softmax over
    # one score is constant 1, so the query path gets an exactly-zero gradient by design.
    query_path = ("attention.norm_q.", "attention.q_proj.", "query_mlp.", "downsample.")
    exempt = name in REGION_BASED and visual_tokens == P
    params = dict(module.named_parameters())
    assert params, "every compressor has at least the projector to train"
    for pname, param in params.items():
        assert param.grad is not None, f"{name} V={visual_tokens}: no gradient reaches {pname}"
        assert torch.isfinite(param.grad).all()
        if not (exempt and pname.startswith(query_path)):
            assert param.grad.abs().sum() > 0, f"{name} V={visual_tokens}: zero gradient for {pname}"


@pytest.mark.parametrize("visual_tokens", PAPER_BUDGETS)
@pytest.mark.parametrize("name", compressors.names())
def test_paper_budgets_on_clip_grid(name: str, visual_tokens: int) -> None:
    """CLIP ViT-L/14-336's 24 x 24 grid: every paper budget works (none: only V = P)."""
    grid = 576
    if name == "none" and visual_tokens != grid:
        with pytest.raises(ValueError, match="valid choices"):
            compressors.check_budget(name, grid, visual_tokens)
        return
    module = make(name, visual_tokens, grid_tokens=grid)
    patches, query = inputs(batch=1, grid_tokens=grid)
    with torch.no_grad():
        assert run(module, patches, query).shape == (1, visual_tokens, LLM)


def test_square_budgets_accepted_by_all_but_none() -> None:
    for name in compressors.names():
        valid = compressors.valid_budgets(name, 576)
        expected = [576] if name == "none" else compressors.square_budgets(576)
        assert set(expected) <= set(valid), name


# --- locality and the query -----------------------------------------------------------------


@pytest.mark.parametrize("visual_tokens", [4, 16])
@pytest.mark.parametrize("name", REGION_BASED)
def test_region_attention_is_local(name: str, visual_tokens: int) -> None:
    module = make(name, visual_tokens).eval()
    patches, query = inputs(batch=1)
    side, out_side = math.isqrt(P), math.isqrt(visual_tokens)
    r = side // out_side
    with torch.no_grad():
        base = run(module, patches, query)
        for row, col in [(0, 0), (side - 1, 2), (3, side - 1), (5, 5)]:
            moved = patches.clone()
            moved[0, row * side + col] += 3.0 * torch.randn(VISION)
            diff = (run(module, moved, query) - base).abs().amax(dim=-1)[0]  # [V]
            region = (row // r) * out_side + col // r
            assert diff[region] > 1e-4, f"patch ({row},{col}) does not reach its region's token"
            others = torch.cat([diff[:region], diff[region + 1 :]])
            assert torch.all(others <= 1e-6), f"patch ({row},{col}) leaks into other regions: {others}"


def test_quecc_depends_on_query_and_requires_it() -> None:
    module = make("quecc", 4).eval()
    assert module.uses_query
    patches, query = inputs()
    with torch.no_grad():
        a = module(patches, query)
        b = module(patches, query + torch.randn_like(query))
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="query_embedding"):
        module(patches, None)
    with pytest.raises(ValueError, match="query_embedding"):
        module(patches)


def test_tokenpacker_ignores_query() -> None:
    module = make("tokenpacker", 4).eval()
    assert not module.uses_query
    patches, query = inputs()
    with torch.no_grad():
        a = module(patches, None)
        b = module(patches, query)
        c = module(patches, torch.randn_like(query))
    assert torch.equal(a, b) and torch.equal(a, c)


# --- prumerge -------------------------------------------------------------------------------


@pytest.mark.parametrize("visual_tokens", [1, 5, 16, 37, 64])
def test_prumerge_keeps_exactly_v_and_is_deterministic(visual_tokens: int) -> None:
    patches, query = inputs()
    module = make("prumerge", visual_tokens)
    with torch.no_grad():
        first = module(patches)
        again = module(patches)
        fresh = make("prumerge", visual_tokens)(patches)
    assert first.shape == (2, visual_tokens, LLM)
    assert torch.equal(first, again) and torch.equal(first, fresh)
    slot = module.assign(patches)
    assert slot.shape == (2, P)
    for b in range(2):  # every slot holds its kept patch, every patch lands in exactly one slot
        assert torch.bincount(slot[b], minlength=visual_tokens).min() >= 1


def test_prumerge_matches_reference_merge() -> None:
    """Against a plain-Python statement of the rule: keep top-V by cosine to the mean patch,
    merge each dropped patch into its most cosine-similar kept patch, average."""
    visual_tokens, batch = 6, 2
    module = make("prumerge", visual_tokens)
    patches, _ = inputs(batch=batch)
    expected = []
    for x in patches:
        unit = x / x.norm(dim=-1, keepdim=True)
        mean = x.mean(0)
        score = unit @ (mean / mean.norm())
        keep = sorted(score.topk(visual_tokens).indices.tolist())
        groups = {k: [k] for k in keep}
        for i in range(P):
            if i not in groups:
                nearest = max(keep, key=lambda k, i=i: float(unit[i] @ unit[k]))
                groups[nearest].append(i)
        expected.append(torch.stack([x[groups[k]].mean(0) for k in keep]))
    with torch.no_grad():
        want = module.projector(torch.stack(expected))
        got = module(patches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prumerge_at_full_budget_is_the_plain_projector() -> None:
    module = make("prumerge", P)
    patches, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(module(patches), module.projector(patches))


# --- FLOPs ----------------------------------------------------------------------------------

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has formulas for the CUDA SDPA kernels but not the CPU one: same rule,
    QK^T plus AV, 2 FLOPs per multiply-add, summed over batch and heads."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


# FlopCounterMode counts matmul-like aten ops only (mm, addmm, bmm, convolution, SDPA). The
# compressors' formulas additionally count, by the documented convention in
# Compressor.flops, 1 FLOP per element summed in non-matmul token reductions; that term is
# added back here, in units of P * vision_dim, so the comparison can be exact. Everything
# else the counter skips (bias adds, GELU, LayerNorm, softmax) the formulas skip too.
TOKEN_REDUCTIONS = {
    "avgpool": 1,  # adaptive average pooling of the grid
    "tokenpacker": 1,  # average pooling to make the region queries
    "prumerge": 2,  # the mean patch (CLS proxy) + scatter-add merge
}


def counted_flops(module: compressors.Compressor, grid_tokens: int, vision_dim: int, llm_dim: int) -> int:
    torch.manual_seed(2)
    patches, query = torch.randn(1, grid_tokens, vision_dim), torch.randn(1, llm_dim)
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    # no torch.no_grad(): FlopCounterMode's module tracker hooks autograd and trips over it;
    # only the forward runs here, so nothing but forward ops is counted either way
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        module(patches, query if module.uses_query else None)
    return counter.get_total_flops()


FLOP_CASES = [
    (name, grid, v)
    for name in compressors.names()
    for grid, v in [(64, 1), (64, 16), (64, 64), (144, 9), (144, 36), (144, 144)]
    if v in compressors.valid_budgets(name, grid)
]


@pytest.mark.parametrize(("name", "grid_tokens", "visual_tokens"), FLOP_CASES)
def test_flops_formula_matches_counted_matmuls(name: str, grid_tokens: int, visual_tokens: int) -> None:
    # widths that differ from each other so a formula that swaps dims cannot pass
    vision_dim, llm_dim = 24, 40
    module = compressors.build(
        name, vision_dim=vision_dim, llm_dim=llm_dim, grid_tokens=grid_tokens, visual_tokens=visual_tokens
    )
    counted = counted_flops(module, grid_tokens, vision_dim, llm_dim)
    reductions = TOKEN_REDUCTIONS.get(name, 0) * grid_tokens * vision_dim
    assert counted > 0
    assert module.flops() == pytest.approx(counted + reductions, rel=1e-9)


def test_flops_grow_with_budget() -> None:
    for name in compressors.names():
        budgets = [v for v in compressors.square_budgets(P) if v in compressors.valid_budgets(name, P)]
        flops = [make(name, v).flops() for v in budgets]
        assert flops == sorted(flops), name


def test_num_parameters_counts_trainable_tensors() -> None:
    for name in compressors.names():
        module = make(name, P)
        assert module.num_parameters() == sum(p.numel() for p in module.parameters()) > 0


# --- budgets and names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "visual_tokens"),
    [("avgpool", 9), ("tokenpacker", 9), ("quecc", 2), ("none", 16), ("prumerge", 0), ("learned_queries", 65)],
)
def test_bad_budget_names_valid_choices(name: str, visual_tokens: int) -> None:
    with pytest.raises(ValueError, match=r"valid choices are \[") as err:
        compressors.check_budget(name, P, visual_tokens)
    assert str(compressors.valid_budgets(name, P)) in str(err.value)
    with pytest.raises(ValueError, match="valid choices"):
        make(name, visual_tokens)


def test_unknown_compressor_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown compressor") as err:
        compressors.get("qformer")
    for name in compressors.names():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown compressor"):
        compressors.check_budget("qformer", P, 4)


def test_registry_names() -> None:
    assert compressors.names() == ["avgpool", "learned_queries", "none", "prumerge", "quecc", "tokenpacker"]
    assert [n for n in compressors.names() if compressors.get(n).uses_query] == ["quecc"]


def test_heads_option_is_checked() -> None:
    module = compressors.build(
        "quecc", vision_dim=VISION, llm_dim=LLM, grid_tokens=P, visual_tokens=4, heads=2
    )
    assert module.attention.heads == 2
    with pytest.raises(ValueError, match="heads"):
        compressors.build("tokenpacker", vision_dim=VISION, llm_dim=LLM, grid_tokens=P, visual_tokens=4, heads=3)
