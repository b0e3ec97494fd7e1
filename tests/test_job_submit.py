"""`ray job submit -- tokenscale run` as the README's "On a real cluster" section says it, and
which Ray a driver uses when a `ray start` head exists on the machine.

One head (its dashboard on 127.0.0.1) serves the module: the fixture runs the README's
local-head block (between `<!-- local-head:begin -->` and `<!-- local-head:end -->`)
literally in bash, with only the values of the variables the block defines replaced (free
ports, a temporary store, a tiny grid). That starts the head (token auth, from the activated
venv) and submits the grid. The head gets a private Ray temp dir (RAY_TMPDIR) and HOME (so
its token and `ray start`'s record of it are this module's own); it is stopped by the
process group its bash started (and their children), never by `ray stop`, which would end
every Ray on the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, free_port, stop_processes, tiny_grid

pytestmark = pytest.mark.slow

BEGIN, END = "<!-- local-head:begin -->", "<!-- local-head:end -->"
VARIABLES = ("RAY_PORT", "DASHBOARD_PORT", "AGENT_PORT", "CLIENT_PORT", "STORE", "GRID")
JOB_ID = re.compile(r"Job '(raysubmit_\w+)' submitted successfully")


def readme_block() -> str:
    """The shell commands of the README's local-head block (its fenced code)."""
    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN} ... {END} block"
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", block, flags=re.S | re.M)
    assert len(fenced) == 1, "the local-head block holds one fenced code block"
    return fenced[0]


def with_values(script: str, values: dict[str, str]) -> str:
    """`script` with the value of each `NAME=value` assignment of VARIABLES replaced; every
    one must be assigned exactly once, so that the README and this test stay in step."""
    for name in VARIABLES:
        pattern = re.compile(rf"(?<![\w$]){name}=\S+")
        assert len(pattern.findall(script)) == 1, f"the block assigns {name} once"
        script = pattern.sub(f"{name}={values[name]}", script)
    return script


def mini_grid(name: str, **overrides) -> dict:
    """One trial, one benchmark, one step per stage: the cheapest grid that trains."""
    return tiny_grid(
        name, llms=1, visual_tokens=(4,),
        data={"benchmarks": ["color"], "train_examples": 16, "eval_examples": 8},
        train={"zero_stage": 0, "micro_batch": 8, "stage1_steps": 1, "stage2_steps": 1},
        **overrides,
    )


def broken_checkpoint_grid(root: Path) -> dict:
    """A grid whose one trial passes validation, then fails the same way every time: its LLM
    is a checkpoint folder with a valid config.json and tokenizer but a corrupt weights file,
    so `from_pretrained` raises in the trial (a checkpoint LLM needs data.llava: two images)."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    llm, images = root / "broken-llm", root / "images"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["What color is it?", "red", "blue"] * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>").save_pretrained(llm)
    (llm / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": backend.get_vocab_size(),
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64, "tie_word_embeddings": False,
    }))
    (llm / "model.safetensors").write_bytes(b"\x00" * 64)  # not a safetensors file
    images.mkdir()
    records = []
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (16, 16), color).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": color}]})
    (root / "data.json").write_text(json.dumps(records))
    return mini_grid("broken") | {
        "llms": [{"name": "broken", "path": str(llm)}],
        "data": {"llava": {"train": str(root / "data.json"), "image_folder": str(images),
                           "eval": [{"name": "colors", "task_family": "reasoning", "path": str(root / "data.json")}]}},
    }


def family_of(group: int) -> list[psutil.Process]:
    """Every process of process group `group` and their descendants: Ray's workers (the job's
    driver, Tune's trials) run in process groups of their own, as children of the raylet."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == group:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    family = {p.pid: p for p in members}
    for proc in members:
        try:
            family.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    return list(family.values())


def stop_group(group: int) -> None:
    """Stop what the bash of process group `group` started, and nothing else."""
    stop_processes(family_of(group))


class Head:
    """The README's local head, as the block left it, and how to talk to it as its user does."""

    def __init__(self, root: Path):
        self.root = root
        self.temp = Path(tempfile.mkdtemp(prefix="rtj", dir="/tmp"))  # short: Ray's socket paths
        self.home = root / "home"
        self.home.mkdir()
        self.values = {
            "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()), "AGENT_PORT": str(free_port()),
            "CLIENT_PORT": str(free_port()), "STORE": str(root / "store"), "GRID": str(root / "grid.yaml"),
        }
        self.url = f"http://127.0.0.1:{self.values['DASHBOARD_PORT']}"
        # what the block's shell starts with: no Ray address or auth mode of the caller's, a
        # HOME without a token (the block makes one), and the caches of the real HOME (the
        # benchmarks, the DeepSpeed op torch builds once)
        real_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                                      "RAY_AUTH_TOKEN_PATH", "VIRTUAL_ENV")}
        self.env.update({
            "HOME": str(self.home), "RAY_TMPDIR": str(self.temp), "XDG_CACHE_HOME": real_cache,
            "TOKENSCALE_CACHE": os.environ.get("TOKENSCALE_CACHE") or os.path.join(real_cache, "tokenscale", "benchmarks"),
        })
        self.group: int | None = None
        self.block: subprocess.CompletedProcess | None = None  # the README block's run

    def client_env(self, **extra: str) -> dict[str, str]:
        """A later shell of the README's user: token auth on, the token in ~/.ray/auth_token."""
        return {**self.env, "RAY_AUTH_MODE": "token", "PATH": f"{REPO / '.venv' / 'bin'}:{self.env['PATH']}", **extra}

    def run_block(self) -> subprocess.CompletedProcess:
        script = "set -e\n" + with_values(readme_block(), self.values)
        proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.group = proc.pid
        out, _ = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    def ray(self, *args: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / ".venv" / "bin" / "ray"), *args], cwd=cwd or self.root,
                              env=self.client_env(**extra), capture_output=True, text=True, timeout=600)

    def stop(self) -> None:
        if self.group is not None:
            stop_group(self.group)
            self.group = None


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the README's block activates the repository's .venv (make install)")
    head = Head(tmp_path_factory.mktemp("job-submit"))
    Path(head.values["GRID"]).write_text(yaml.safe_dump(mini_grid("readme")))
    try:
        head.block = head.run_block()
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp, ignore_errors=True)


def _rows(store: str, grid: str) -> int:
    from tokenscale.store import Store

    return Store.open(store).read_results(grid).num_rows


def test_readme_local_head_block_runs_a_grid(head):
    out = head.block.stdout
    assert head.block.returncode == 0, out[-4000:]
    assert "succeeded" in out and "grid readme: 1/1 trials done" in out, out[-4000:]
    assert _rows(head.values["STORE"], "readme") == 1  # one trial x one benchmark
    # `ray get-auth-token --generate` made the token where Ray looks for it by default
    assert (head.home / ".ray" / "auth_token").is_file()


def test_job_logs_show_tune_progress_and_the_summary(head):
    assert head.block.returncode == 0, head.block.stdout[-4000:]
    job_id = JOB_ID.search(head.block.stdout).group(1)
    logs = head.ray("job", "logs", "--address", head.url, job_id)
    assert logs.returncode == 0, logs.stderr[-3000:]
    assert "== Status ==" in logs.stdout and "Trial name" in logs.stdout  # Tune's table, with our columns
    assert re.search(r"\| llm\s+\|\s+V \| compressor", logs.stdout), logs.stdout[-3000:]
    assert "grid readme: 1/1 trials done (0 already in the store), 0 errored" in logs.stdout


@pytest.fixture(scope="module")
def broken_grid(tmp_path_factory) -> Path:
    """broken.yaml, alone in its folder (what a job uploads)."""
    root = tmp_path_factory.mktemp("broken")
    (root / "job").mkdir()
    (root / "job" / "broken.yaml").write_text(yaml.safe_dump(broken_checkpoint_grid(root)))
    return root / "job" / "broken.yaml"


def test_errored_trial_fails_the_job(head, broken_grid, tmp_path):
    """A grid with an errored trial: `tokenscale run` exits 1, so the job ends FAILED and
    `ray job submit` exits 1. The client here has the token in RAY_AUTH_TOKEN and no
    ~/.ray/auth_token, as on a machine other than the head."""
    token = (head.home / ".ray" / "auth_token").read_text().strip()
    elsewhere = tmp_path / "client-home"
    elsewhere.mkdir()
    job = head.ray("job", "submit", "--address", head.url, "--working-dir", broken_grid.parent.name, "--",
                   "tokenscale", "run", broken_grid.name, "--store", str(tmp_path / "store"),
                   cwd=broken_grid.parent.parent, HOME=str(elsewhere), RAY_AUTH_TOKEN=token)
    assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-3000:]
    assert "grid broken: 0/1 trials done (0 already in the store), 1 errored" in job.stdout, job.stdout[-3000:]
    assert "SafetensorError" in job.stdout, job.stdout[-3000:]  # from_pretrained's, in the job's logs
    status = head.ray("job", "status", "--address", head.url, JOB_ID.search(job.stdout).group(1),
                      HOME=str(elsewhere), RAY_AUTH_TOKEN=token)
    assert "failed" in status.stdout + status.stderr and "exit code 1" in status.stdout + status.stderr


def _jobs(head: Head) -> list[dict]:
    """Every job the head knows: submitted ones and drivers that joined it."""
    jobs = head.ray("list", "jobs", "--address", head.url, "--format", "json")
    assert jobs.returncode == 0, jobs.stderr[-3000:]
    return json.loads(jobs.stdout)


def test_address_joins_the_head(head, broken_grid, tmp_path):
    """`tokenscale run --address HOST:PORT` from a shell joins that cluster (token auth on,
    as the README says); the grid's errored trial makes it exit 1."""
    before = len(_jobs(head))
    run = subprocess.run(
        [str(REPO / ".venv" / "bin" / "tokenscale"), "run", str(broken_grid), "--store", str(tmp_path / "store"),
         "--verbose", "0", "--address", f"127.0.0.1:{head.values['RAY_PORT']}"],
        cwd=tmp_path, env=head.client_env(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in run.stderr and "1 errored" in run.stdout
    assert len(_jobs(head)) == before + 1, "the driver is a job of the head"


def _driver(head: Head, store: Path, grid: str) -> subprocess.CompletedProcess:
    """`tokenscale run` in a shell of this machine without RAY_ADDRESS, with Ray's temp dir
    (and so `ray start`'s record of the head) the head's."""
    grid_file = store.parent / f"{grid}.yaml"
    grid_file.write_text(yaml.safe_dump(mini_grid(grid)))
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(REPO / ".venv" / "bin" / "tokenscale"), "run", str(grid_file), "--store", str(store),
                           "--verbose", "0"], cwd=head.root, env=env, capture_output=True, text=True, timeout=600)


def test_driver_without_address_does_not_join_a_live_head(head, tmp_path):
    assert head.block.returncode == 0, head.block.stdout[-4000:]
    record = head.temp / "ray" / "ray_current_cluster"
    assert record.read_text().strip().endswith(f":{head.values['RAY_PORT']}"), "ray start recorded the head"
    jobs_before = _jobs(head)
    run = _driver(head, tmp_path / "store", "live")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Started a local Ray instance" in run.stderr and "Connecting to existing Ray cluster" not in run.stderr
    assert len(_jobs(head)) == len(jobs_before), "the driver registered no job on the head"
    assert _rows(str(tmp_path / "store"), "live") == 1


def test_driver_without_address_ignores_a_dead_heads_record(head, tmp_path):
    """Last in the module: it stops the shared head, whose record stays in Ray's temp dir."""
    head.stop()
    record = head.temp / "ray" / "ray_current_cluster"
    assert record.is_file(), "a head killed without `ray stop` leaves its record"
    run = _driver(head, tmp_path / "store", "stale")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Started a local Ray instance" in run.stderr
    assert _rows(str(tmp_path / "store"), "stale") == 1
