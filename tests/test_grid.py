"""Grid YAML validation: every bad input named by field, before anything runs."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, tiny_grid

from tokenscale.orchestrator.grid import GridError, estimate_llm_params, load_grid, parse_grid


def test_demo_grid_parses_and_expands():
    grid = load_grid(REPO / "configs" / "demo.yaml")
    trials = grid.trials()
    assert len(trials) == len(grid.llms) * len(grid.visual_tokens) * len(grid.compressors) * len(grid.seeds)
    assert len({t.config_hash for t in trials}) == len(trials)
    sizes = [estimate_llm_params(t.llm) for t in trials]
    assert sizes[0] == min(sizes), "the smallest model starts first"
    first_largest = sizes.index(max(sizes))
    assert first_largest <= len(grid.visual_tokens) * len(grid.compressors), "the largest never waits behind all others"


def test_param_estimate_matches_the_built_model():
    from tokenscale.workers.model import build_llm, non_embedding_params

    for llm in parse_grid(tiny_grid()).llms:
        assert estimate_llm_params(llm) == non_embedding_params(build_llm(llm, 60))


def test_resources_by_size_band():
    raw = tiny_grid(resources={
        "workers": 4, "cpus_per_worker": 1,
        "bands": [{"max_params": 5000, "workers": 1}, {"max_params": 20000, "workers": 2}],
        "node_types": [{"cpus": 8, "gpus": 0}],
    })
    grid = parse_grid(raw)
    by_llm = {t.llm.name: grid.resources.for_llm(t.llm)["workers"] for t in grid.trials()}
    sizes = {llm.name: estimate_llm_params(llm) for llm in grid.llms}
    assert sizes["xs"] <= 5000 < sizes["s"] <= 20000 < sizes["m"]
    assert by_llm == {"xs": 1, "s": 2, "m": 4}
    raw["resources"]["bands"].insert(0, {"llms": ["m"], "workers": 3})
    assert parse_grid(raw).resources.for_llm(grid.llms[2])["workers"] == 3
    # auto: one CPU worker trains inside the Tune trial; a worker group otherwise
    assert {t.llm.name: grid.resources.for_llm(t.llm)["execution"] for t in grid.trials()} == {
        "xs": "in_trial", "s": "workers", "m": "workers"}


def test_execution_auto_uses_a_worker_group_for_gpus():
    raw = tiny_grid(resources={"workers": 1, "gpus_per_worker": 1, "node_types": [{"cpus": 8, "gpus": 1}]})
    llm = parse_grid(raw).llms[0]
    assert parse_grid(raw).resources.for_llm(llm)["execution"] == "workers"
    raw["resources"]["execution"] = "in_trial"
    assert parse_grid(raw).resources.for_llm(llm)["execution"] == "in_trial"


def test_config_hash_is_stable_and_sensitive():
    a = parse_grid(tiny_grid()).trials()[0]
    b = parse_grid(tiny_grid()).trials()[0]
    c = parse_grid(tiny_grid(train={"stage2_steps": 5})).trials()[0]
    assert a.config_hash == b.config_hash
    assert a.config_hash != c.config_hash


@pytest.mark.parametrize(
    "change, message",
    [
        ({"llms": []}, "llms: expected a non-empty list"),
        ({"visual_tokens": [1, 9]}, "valid choices are"),
        ({"compressors": ["magic"]}, "compressors[0]: unknown compressor 'magic'"),
        ({"speed": 3}, "speed: unknown key"),
        ({"train": {"zero_stage": 7}}, "train.zero_stage"),
        ({"train": {"micro_batch": "big"}}, "train.micro_batch: expected an integer"),
        ({"grid": "bad name/with slash"}, "not a valid name"),
        ({"data": {"benchmarks": ["tea"]}}, "data.benchmarks[0]: unknown benchmark"),
        ({"llms": [{"name": "x", "hidden_size": 30, "heads": 4}]}, "divisible"),
        ({"llms": [{"name": "x", "path": "/nonexistent/ckpt"}]}, "llms[0].path"),
        ({"vision": {"image_size": 30, "patch_size": 4}}, "vision.patch_size"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
        ({"resources": {"workers": 0}}, "resources"),
        ({"llms": [{"hidden_size": 32}]}, "llms[0].name: required"),
        ({"resources": {"gpus_per_worker": 1, "node_types": [{"cpus": 8}]}}, "no node type has that"),
        ({"resources": {"cpus_per_worker": 4096}}, "no node type has that"),
        ({"resources": {"placement_strategy": "ANYWHERE"}}, "resources.placement_strategy"),
        ({"resources": {"bands": [{"max_params": 10}, {"max_params": 5}]}}, "must increase"),
        ({"seeds": [0.5]}, "seeds[0]: expected an integer"),
        ({"resources": {"execution": "threads"}}, "resources.execution"),
        ({"vision": {"image_size": 16, "patch_size": 4, "stem_layers": 0}}, "vision.stem_layers"),
        ({"resources": {"workers": 2, "execution": "in_trial"}}, "resources.workers: in_trial runs one process"),
    ],
)
def test_bad_grids_name_the_field(change, message):
    raw = tiny_grid()
    raw.update(change)
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    assert message in str(err.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("grid: [unclosed")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(path)
    path.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(GridError, match="top level must be a mapping"):
        load_grid(path)
