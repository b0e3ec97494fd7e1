"""Cluster configs in infra/: valid YAML, autoscaling from zero, resources consistent with
the grid's rule, entrypoints that exist."""

from __future__ import annotations

import shlex

import pytest
import tomllib
import yaml
from conftest import REPO

from tokenscale.cli import build_parser
from tokenscale.config import load_grid
from tokenscale.configs import grid_path

INFRA = REPO / "infra"


def load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def test_launcher_autoscales_gpu_workers_from_zero():
    cluster = load("aws-cluster.yaml")
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head never takes a Train worker"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types
    for t in gpu_types.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())
    setup = " && ".join(cluster["setup_commands"])
    assert "torch==2.13.0" in setup and setup.index("torch==2.13.0") < setup.index("pip install -q -e")
    assert any("--autoscaling-config" in c for c in cluster["head_start_ray_commands"])
    assert "IamInstanceProfile" in head["node_config"], "S3 access through the instance role"


def test_kuberay_cluster_autoscaling_and_groups_from_zero():
    cluster = load("kuberay-raycluster.yaml")
    assert cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        gpus = int(group["rayStartParams"]["num-gpus"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == gpus
        assert group["template"]["spec"]["serviceAccountName"], "S3 through the pod's identity"


def _node_types(name: str) -> list[tuple[float, float]]:
    if name == "aws":
        types = load("aws-cluster.yaml")["available_node_types"].values()
        return [(t["resources"]["CPU"], t["resources"].get("GPU", 0)) for t in types if t["resources"].get("GPU", 0)]
    groups = load("kuberay-raycluster.yaml")["spec"]["workerGroupSpecs"]
    return [(float(g["rayStartParams"]["num-cpus"]), float(g["rayStartParams"]["num-gpus"])) for g in groups]


@pytest.mark.parametrize("infra", ["aws", "kuberay"])
def test_every_trial_of_the_paper_grid_fits_a_worker_type(infra):
    grid = load_grid(REPO / "configs" / "paper.yaml")
    nodes = _node_types(infra)
    declared = sorted((n.cpus, n.gpus) for n in grid.resources.node_types)
    assert declared == sorted(nodes), "the grid's node_types mirror the cluster's GPU worker types"
    for trial in grid.trials():
        shape = grid.resources.for_llm(trial.llm)
        fits = [(c, g) for c, g in nodes if shape["cpus_per_worker"] <= c and shape["gpus_per_worker"] <= g]
        assert fits, (trial.llm.name, shape)
        if shape["placement_strategy"] == "STRICT_PACK":  # all workers of a trial on one node
            assert any(shape["workers"] * shape["gpus_per_worker"] <= g for _, g in fits), (trial.llm.name, shape)


def test_entrypoints_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tokenscale"] == "tokenscale.cli:main"
    job = load("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == load("kuberay-raycluster.yaml")["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["tokenscale", "run"]
    args = build_parser().parse_args(argv[1:])  # the CLI accepts it as written
    assert grid_path(args.config) == grid_path("paper") and args.store.startswith("s3://")
    load_grid(grid_path(args.config))  # the packaged grid, as the image installs it
    assert "runtimeEnvYAML" not in job["spec"], "an uploaded checkout would hide the installed package"
    header = (INFRA / "aws-cluster.yaml").read_text()
    assert "ray job submit" in header and "--working-dir configs -- \\\n#       tokenscale run paper.yaml" in header
    assert (REPO / "configs" / "paper.yaml").is_file() and "RAY_AUTH_MODE=token" in header
