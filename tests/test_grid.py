"""Grid YAML validation: every bad input named by field, before anything runs."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, tiny_grid

from tokenscale.config import (
    GridError,
    TrialConfig,
    estimate_llm_params,
    grid_to_dict,
    load_grid,
    parse_grid,
    parse_trial,
)


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
    }, train={"micro_batch": 8, "global_batch": 96, "stage1_steps": 2, "stage2_steps": 4},  # 1, 2, 3 or 4 workers
        vision={**tiny_grid()["vision"], "token_norm": "none"})
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
    # how often a trial reports its progress is how it runs, not what it computes
    for every in (0, 3):
        raw = tiny_grid()
        raw["train"]["report_every"] = every
        assert parse_grid(raw).trials()[0].config_hash == a.config_hash


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
        ({"llms": [{"name": "x", "path": "s3://bucket/Qwen1.5-0.5B"}]}, "llms[0].path: a checkpoint LLM needs data.llava"),
        ({"vision": {"path": "s3://bucket/clip", "image_size": 16, "patch_size": 4}}, "vision.path: a checkpoint tower needs data.llava"),
        ({"train": {"micro_batch": 8, "stage2_global_batch": 12}}, "train.stage2_global_batch: 12 examples per step do not split"),
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


# ---- the typed config: one path from YAML to the worker's dict ----------------------------


def test_trial_dict_round_trips_through_the_model():
    for trial in parse_grid(tiny_grid()).trials():
        assert TrialConfig.model_validate(trial.to_dict()) == trial  # what a worker receives
        assert parse_trial(trial.to_dict()).config_hash == trial.config_hash
    grid = load_grid(REPO / "configs" / "demo.yaml")
    assert parse_grid(grid_to_dict(grid)) == grid  # what the driver saves beside the results


def test_misspelt_compressor_option_is_named_before_anything_runs():
    raw = tiny_grid(compressors=[{"name": "quecc", "options": {"kernal": 3}}])
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    assert str(err.value).startswith("compressors[0].options.kernal: compressor 'quecc' takes no option 'kernal'")
    assert "heads" in str(err.value), "lists the options the constructor takes"
    raw = tiny_grid(compressors=[{"name": "quecc", "options": {"heads": "two"}}])
    with pytest.raises(GridError, match=r"compressors\[0\].options.heads: compressor 'quecc' expects int \| None"):
        parse_grid(raw)
    assert parse_grid(tiny_grid(compressors=[{"name": "quecc", "options": {"heads": 2}}])).compressors[0].options == {"heads": 2}
    with pytest.raises(GridError, match="compressor_options|options.heads"):
        parse_trial({**parse_grid(tiny_grid()).trials()[0].to_dict(), "compressor": "quecc",
                     "compressor_options": {"heads": "two"}})


def test_option_names_read_without_torch_match_the_constructors():
    import inspect

    from tokenscale import compressors

    for name in compressors.names():
        signature = inspect.signature(compressors.get(name).__init__)
        real = {p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert set(compressors.options(name)) == {p.name for p in real}, name
        assert compressors.get(name).uses_query == compressors.uses_query(name)


def test_unknown_key_lists_the_valid_ones():
    raw = tiny_grid()
    raw["llms"][1]["colour"] = "red"
    with pytest.raises(GridError) as err:
        parse_grid(raw)
    assert str(err.value).startswith("llms[1].colour: unknown key; valid keys here are name, hidden_size")


def test_declared_params_are_the_law_n():
    raw = tiny_grid()
    raw["llms"][0]["params"] = 5.0e8
    grid = parse_grid(raw)
    from tokenscale.config import planned_llm_params

    assert planned_llm_params(grid.llms[0]) == 5.0e8
    assert planned_llm_params(grid.llms[1], vocab_size=60) > estimate_llm_params(grid.llms[1])  # + embeddings
    with pytest.raises(GridError, match=r"llms\[0\].params"):
        parse_grid({**raw, "llms": [{**raw["llms"][0], "params": -1}]})


def test_every_packaged_grid_validates_against_the_schema():
    import json
    import subprocess

    import jsonschema

    out = subprocess.run([str(REPO / ".venv" / "bin" / "tokenscale"), "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"demo.yaml", "paper.yaml"}
    for file in files:
        jsonschema.validate(yaml.safe_load(file.read_text()), schema)
    bad = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    bad["train"]["zero_stage"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    bad["compressors"] = ["magic"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_plan_lists_trials_costs_and_the_store(tmp_path, capsys):
    import json
    from datetime import datetime, timezone

    from tokenscale.cli import main
    from tokenscale.costs import inference_flops
    from tokenscale.store import Store, result_row

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(tiny_grid()))
    store = tmp_path / "store"
    assert main(["plan", str(path), "--store", str(store), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    trials = parse_grid(tiny_grid()).trials()
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in trials]
    assert not any(r["in_store"] for r in rows)
    for row in rows:
        assert row["inference_flops_q0"] == inference_flops(row["llm_params"], 0, row["visual_tokens"], 0, row["compressor"])
        assert row["training_flops"] > 6 * row["llm_params"]
    # bigger LLM, more training FLOPs at the same V
    by = {(r["llm"], r["visual_tokens"]): r["training_flops"] for r in rows}
    assert by[("xs", 1)] < by[("s", 1)] < by[("m", 1)]

    done = trials[0]
    Store.open(str(store)).write_results(done.grid, done.compressor, done.config_hash, [result_row(
        grid=done.grid, trial_id=done.trial_id, config_hash=done.config_hash, llm=done.llm.name, llm_params=1,
        llm_params_non_embedding=1, visual_tokens=done.visual_tokens, compressor=done.compressor,
        compressor_params=1, compressor_flops=1.0, seed=done.seed, benchmark="color", task_family="reasoning",
        score=0.5, error=0.5, chance=0.25, n_examples=1, text_tokens_mean=1.0, generated_tokens=1,
        inference_flops=1.0, train_seconds=1.0, eval_seconds=1.0, code_version="t",
        finished_at=datetime.now(timezone.utc),
    )])
    assert main(["plan", str(path), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"{len(trials)} trials, 1 already in the store" in out
    assert sum(line.rstrip().endswith("yes") for line in out.splitlines()) == 1


def test_plan_rejects_a_bad_grid_with_exit_2(tmp_path):
    import subprocess

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(compressors=[{"name": "quecc", "options": {"kernal": 3}}])))
    out = subprocess.run([str(REPO / ".venv" / "bin" / "tokenscale"), "plan", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "compressors[0].options" in out.stderr and "kernal" in out.stderr
    assert out.stdout == ""


def test_shipped_schema_file_is_what_tokenscale_schema_prints():
    """configs/*.yaml point editors at configs/grid.schema.json (yaml-language-server)."""
    import json

    from tokenscale.config import grid_json_schema

    shipped = json.loads((REPO / "configs" / "grid.schema.json").read_text())
    assert shipped == grid_json_schema(), "regenerate: tokenscale schema > configs/grid.schema.json"
    for file in (REPO / "configs").glob("*.yaml"):
        assert file.read_text().splitlines()[0] == "# yaml-language-server: $schema=./grid.schema.json", file


def test_holdout_llms_are_validated_and_do_not_move_the_hash():
    raw = tiny_grid("held", llms=3)
    plain = parse_grid(raw).trials()
    raw["llms"][2]["holdout"] = True
    held = parse_grid(raw).trials()
    assert [t.config_hash for t in held] == [t.config_hash for t in plain], "holdout changes how results are used only"
    raw["llms"][1]["holdout"] = True
    with pytest.raises(GridError, match=r"^llms: holdout leaves 1 LLM\(s\) to fit the law on \(xs\)"):
        parse_grid(raw)


def test_tracking_is_validated_and_moves_no_hash(tmp_path):
    """`tracking:` is how a grid is watched, not what its trials compute: no config hash
    moves (stored results stay done), and every bad value is named by its field."""
    tracking = {
        "wandb": {"project": "p", "mode": "offline", "dir": str(tmp_path), "group": "g", "entity": "e"},
        "mlflow": {"tracking_uri": "http://mlflow.internal:5000", "experiment_name": "x"},
    }
    plain, tracked = parse_grid(tiny_grid()), parse_grid(tiny_grid(tracking=tracking))
    assert [t.config_hash for t in tracked.trials()] == [t.config_hash for t in plain.trials()]
    assert parse_grid(grid_to_dict(tracked)) == tracked and tracked.tracking.wandb.mode == "offline"
    assert parse_grid(tiny_grid(tracking={"mlflow": {"tracking_uri": "file:///tmp/mlruns"}})).tracking.wandb is None
    for change, message in [
        ({"wandb": {"mode": "online"}}, "tracking.wandb.project: required"),
        ({"wandb": {"project": "p", "api_key": "k"}}, "tracking.wandb.api_key: unknown key"),
        ({"wandb": {"project": "p", "mode": "offline"}}, "tracking.wandb.dir: required with mode: offline"),
        ({"wandb": {"project": "p", "mode": "sometimes"}}, "tracking.wandb.mode"),
        ({"mlflow": {"tracking_uri": "https://me:hunter2@mlflow.internal"}}, "tracking.mlflow.tracking_uri: holds a password"),
        ({"mlflow": {}}, "tracking.mlflow.tracking_uri: required"),
        ({"tensorboard": {}}, "tracking.tensorboard: unknown key; valid keys here are wandb, mlflow"),
    ]:
        with pytest.raises(GridError) as err:
            parse_grid(tiny_grid(tracking=change))
        assert message in str(err.value) and "hunter2" not in str(err.value)


def test_a_tracker_not_installed_is_named_before_anything_starts(tmp_path, monkeypatch, capsys):
    """`run` and `resume` exit 2 naming the field and the extra to install, before Ray is
    imported or anything is written; `plan` only notes it (the driver may run elsewhere)."""
    import sys

    from tokenscale.cli import main
    from tokenscale.config import check_tracking
    from tokenscale.store import Store

    raw = tiny_grid("tracked", tracking={"wandb": {"project": "p"}})
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    store = Store.open(str(tmp_path / "store"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib then finds: nothing
    fix = "tracking.wandb: the wandb package is not installed; pip install 'tokenscale[wandb]'"
    with pytest.raises(GridError, match=r"^" + fix.replace("[", r"\[").replace("]", r"\]")):
        check_tracking(parse_grid(raw))
    assert main(["run", str(tmp_path / "g.yaml"), "--store", store.uri]) == 2
    assert capsys.readouterr().err.startswith(f"tokenscale run: error: {fix}")
    assert not store.exists(store.join("tracked", "grid.yaml")), "nothing was written"
    store.put_bytes(store.join("tracked", "grid.yaml"), yaml.safe_dump(raw).encode())  # as `run` saves it
    assert main(["resume", "tracked", "--store", store.uri]) == 2
    assert capsys.readouterr().err.startswith(f"tokenscale resume: error: {fix}")
    assert main(["plan", str(tmp_path / "g.yaml"), "--store", store.uri]) == 0
    assert capsys.readouterr().err.startswith(f"tokenscale plan: note: {fix}")
    # MLflow's database stores need SQLAlchemy and Alembic, which mlflow-skinny leaves out
    monkeypatch.setitem(sys.modules, "alembic", None)
    with pytest.raises(GridError, match=r"^tracking.mlflow.tracking_uri: a database URI \(sqlite\) needs SQLAlchemy"):
        check_tracking(parse_grid(tiny_grid(tracking={"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}})))
    check_tracking(parse_grid(tiny_grid(tracking={"mlflow": {"tracking_uri": "https://mlflow.internal"}})))
