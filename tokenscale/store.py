"""The store: where results, laws and plots live, and the one place that knows their schema.

A store is a local directory or ``s3://bucket/prefix``. Writers (the trial that finishes)
and readers (DuckDB, fitting, the Serve app) all go through this module, so the layout and
the column set are defined once:

    <store>/<grid>/results/grid=<grid>/compressor=<c>/<config_hash>.parquet   one per trial
    <store>/<grid>/results/grid=<grid>/compressor=<c>/<config_hash>.eval-<set>.parquet
                                                           one per kept trial and later eval set
    <store>/<grid>/curves/grid=<grid>/compressor=<c>/<config_hash>.parquet    one per trial: its
                                                           training curve (before its result)
    <store>/<grid>/weights/compressor=<c>/<config_hash>.pt                      train.keep_final
    <store>/features/<key>/shard-<k>.npy       a frozen tower's LLaVA features (workers/llava_data.py)
    <store>/<grid>/laws/laws.parquet                                            one per fit
    <store>/<grid>/laws/draws.parquet                                           its laws' bootstrap draws
    <store>/<grid>/laws/heldout.parquet                                         held-out LLMs vs the laws
    <store>/<grid>/plots/*.png

Every object is written whole with one PUT (S3) or one atomic rename (local), and a
result's key is its trial's config hash, so a retried or resumed trial overwrites its own
object instead of adding a second one.
"""

from __future__ import annotations

import functools
import io
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_STORE = "./tokenscale-store"

# One row per (trial, benchmark).
RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grid", "string"),
    ("trial_id", "string"),
    ("config_hash", "string"),
    ("llm", "string"),
    ("llm_params", "int64"),  # N as the paper's fitter uses it: declared `params`, else counted
    ("llm_params_non_embedding", "int64"),  # counted, beside N
    ("visual_tokens", "int64"),
    ("compressor", "string"),
    ("compressor_params", "int64"),
    ("compressor_flops", "double"),
    ("seed", "int64"),
    ("benchmark", "string"),
    ("task_family", "string"),
    ("score", "double"),
    ("error", "double"),
    ("chance", "double"),
    ("n_examples", "int64"),
    ("text_tokens_mean", "double"),
    ("generated_tokens", "int64"),
    ("inference_flops", "double"),
    ("train_seconds", "double"),
    ("eval_seconds", "double"),
    ("code_version", "string"),
    ("finished_at", "timestamp[us, tz=UTC]"),
)



@dataclass(frozen=True)
class ResultRow:
    """One (trial, benchmark) result: the only way a row is built (the trial's writer, the
    tests' and benchmarks' synthetic rows), so every writer fills every column of
    RESULT_SCHEMA with the right type."""

    grid: str
    trial_id: str
    config_hash: str
    llm: str
    llm_params: int
    llm_params_non_embedding: int
    visual_tokens: int
    compressor: str
    compressor_params: int
    compressor_flops: float
    seed: int
    benchmark: str
    task_family: str
    score: float
    error: float
    chance: float
    n_examples: int
    text_tokens_mean: float
    generated_tokens: int
    inference_flops: float
    train_seconds: float
    eval_seconds: float
    code_version: str
    finished_at: datetime

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _ROW_TYPES[f.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif kind is int and hasattr(value, "__index__") and not isinstance(value, bool):
                object.__setattr__(self, f.name, int(value))
            elif kind is float and hasattr(value, "__float__") and not isinstance(value, (bool, str)):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, kind) or isinstance(value, bool):
                raise TypeError(f"result row {f.name}: expected {kind.__name__}, got {value!r}")

    def as_dict(self) -> dict:
        return asdict(self)


_ROW_TYPES = {"str": str, "int": int, "float": float, "datetime": datetime}


def result_row(**values) -> dict:
    """A result row as the writer stores it; raises on a missing, unknown or mistyped column."""
    return ResultRow(**values).as_dict()


# One row per (grid, task_family, compressor, form).
LAW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grid", "string"),
    ("task_family", "string"),
    ("compressor", "string"),
    ("form", "string"),
    ("A", "double"),
    ("B", "double"),
    ("alpha", "double"),
    ("beta", "double"),
    ("D", "double"),
    ("sse", "double"),
    ("r2", "double"),
    ("n_points", "int64"),
    ("alpha_lo", "double"),
    ("alpha_hi", "double"),
    ("beta_lo", "double"),
    ("beta_hi", "double"),
    ("holdout_error", "double"),
    ("D_lo", "double"),
    ("D_hi", "double"),
    ("ratio_lo", "double"),  # CI of alpha / beta, the paper's headline ratio
    ("ratio_hi", "double"),
    ("ci_level", "double"),
    ("loss", "string"),
    ("llm_params_column", "string"),  # the N it was fitted on: one of LAW_N_COLUMNS
    ("ci_resamples", "int64"),  # bootstrap draws behind the CIs (rows in draws.parquet)
    ("ci_seed", "int64"),
    ("min_llm_params", "int64"),
    ("max_llm_params", "int64"),
    ("min_visual_tokens", "int64"),
    ("max_visual_tokens", "int64"),
    ("fitted_at", "timestamp[us, tz=UTC]"),
    # "" when every parameter is identified, else why not (a parameter at its bound, an
    # exponent's CI spanning the whole box): such a law is not a finding
    ("identification", "string"),
    # the form that fits this (task_family, compressor) better: the lower holdout error
    # (then the higher r2); what the demo reads and what /optimal uses when no form is asked
    ("preferred", "bool"),
)

# The result columns a law's N can come from (LAW_SCHEMA's llm_params_column).
LAW_N_COLUMNS: tuple[str, ...] = ("llm_params", "llm_params_non_embedding")

# One row per (grid, task_family, compressor, form, draw): the joint bootstrap draws of
# each law in laws.parquet, refitted with the law's loss from the fit's seed, written by
# the same fit (same fitted_at) just before the laws. B is null for the product form.
DRAW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grid", "string"),
    ("task_family", "string"),
    ("compressor", "string"),
    ("form", "string"),
    ("draw", "int64"),
    ("A", "double"),
    ("B", "double"),
    ("alpha", "double"),
    ("beta", "double"),
    ("D", "double"),
    ("fitted_at", "timestamp[us, tz=UTC]"),
)

# One row per (grid, task_family, compressor, form, held-out LLM, V): an LLM the grid marks
# `holdout: true` is trained and evaluated but left out of the fit; its observed error
# against the law's prediction and the bootstrap interval of it (the paper's 14B check).
HELDOUT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grid", "string"),
    ("task_family", "string"),
    ("compressor", "string"),
    ("form", "string"),
    ("llm", "string"),
    ("llm_params", "int64"),
    ("visual_tokens", "int64"),
    ("observed_error", "double"),
    ("predicted_error", "double"),
    ("predicted_lo", "double"),
    ("predicted_hi", "double"),
    ("fitted_at", "timestamp[us, tz=UTC]"),
)

# One row per (trial, progress report): the trial's training loss every
# `train.report_every` optimizer steps (the mean of the step losses since the point
# before, over all workers), written by the trial just before its result. `steps` is the
# stage's total optimizer steps, `elapsed_seconds` the wall time since the attempt that
# ran the step started (a resumed trial's earlier points keep their attempt's times).
CURVE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("grid", "string"),
    ("trial_id", "string"),
    ("config_hash", "string"),
    ("llm", "string"),
    ("visual_tokens", "int64"),
    ("compressor", "string"),
    ("seed", "int64"),
    ("stage", "int64"),
    ("step", "int64"),
    ("steps", "int64"),
    ("loss", "double"),
    ("elapsed_seconds", "double"),
)

# Each record kind's columns as (name, Arrow type) above, its pyarrow schema
# (`RESULT_SCHEMA`, `LAW_SCHEMA`, `DRAW_SCHEMA`, `CURVE_SCHEMA`) built on first use: pyarrow (and
# numpy under it, ~0.1 s) is imported only where a table is built or read, so the CLI's
# light commands (`sql`, `status`, `plan`) start without it.
_COLUMNS = {"RESULT_SCHEMA": RESULT_COLUMNS, "LAW_SCHEMA": LAW_COLUMNS, "DRAW_SCHEMA": DRAW_COLUMNS,
            "HELDOUT_SCHEMA": HELDOUT_COLUMNS, "CURVE_SCHEMA": CURVE_COLUMNS}


@functools.cache
def arrow_schema(name: str) -> pa.Schema:
    """The pyarrow schema RESULT_SCHEMA, LAW_SCHEMA, DRAW_SCHEMA, HELDOUT_SCHEMA, CURVE_SCHEMA by name."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(),
             "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"), "bool": pa.bool_()}
    return pa.schema([(column, types[kind]) for column, kind in _COLUMNS[name]])


def __getattr__(name: str) -> Any:
    """`from tokenscale.store import RESULT_SCHEMA` (and the others) still works."""
    if name in _COLUMNS:
        return arrow_schema(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


S3_ATTEMPTS = 4  # per request, with boto3's standard backoff


class StoreError(OSError):
    """The store could not be reached or answered an error: one line naming the store, what
    was being done and the cause (the CLI prints it and exits 3)."""


class StoreWriteError(StoreError):
    """An object could not be written; nothing partial is left behind."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def check_name(kind: str, value: str) -> str:
    """Grid and compressor names become path segments: keep them to a safe alphabet."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use letters, digits, '_', '.', '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    return value


def one_line(err: BaseException | str, limit: int = 400) -> str:
    """An error's message on one line (whitespace runs collapsed), at most `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_store(uri: str | None) -> str:
    """--store, else $TOKENSCALE_STORE, else ./tokenscale-store; local paths made absolute."""
    uri = uri or os.environ.get("TOKENSCALE_STORE") or DEFAULT_STORE
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"store {uri!r} has no bucket: use s3://BUCKET/PREFIX")
        prefix = parsed.path.strip("/")
        return f"s3://{parsed.netloc}/{prefix}" if prefix else f"s3://{parsed.netloc}"
    if "://" in uri:
        raise ValueError(f"store {uri!r}: use s3://bucket/prefix or a local directory")
    return str(Path(uri).expanduser().resolve())


_CLIENT_LOCK = threading.Lock()


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a temp file beside `path`, then rename it over `path`: readers see
    the old file or the new one, never a partial one; a failed write leaves nothing behind."""
    folder = os.path.dirname(os.fspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the usual AWS environment (None = AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s columns and types: columns an older writer did not have come
    back as nulls, so stores written before a column was added stay readable."""
    import pyarrow as pa

    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class Store:
    """A resolved store URI with the few operations the project needs."""

    uri: str

    @classmethod
    def open(cls, uri: str | None = None) -> Store:
        return cls(resolve_store(uri))

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    # ---- paths ------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    def result_key(self, grid: str, compressor: str, config_hash: str) -> str:
        return self.join(grid, "results", f"grid={grid}", f"compressor={compressor}", f"{config_hash}.parquet")

    def eval_result_key(self, grid: str, compressor: str, config_hash: str, eval_set: str) -> str:
        """The rows of an eval set scored after the trial (`tokenscale eval`): an object of
        their own, beside the trial's, written once."""
        return self.join(grid, "results", f"grid={grid}", f"compressor={compressor}", f"{config_hash}.eval-{eval_set}.parquet")

    def curve_key(self, grid: str, compressor: str, config_hash: str) -> str:
        """A trial's training curve: beside its results, not under results/ (whose glob
        reads every parquet object there as result rows)."""
        return self.join(grid, "curves", f"grid={grid}", f"compressor={compressor}", f"{config_hash}.parquet")

    def curves_glob(self, grid: str | None = None) -> str:
        return self.join(grid or "*", "curves", "**", "*.parquet")

    def weights_key(self, grid: str, compressor: str, config_hash: str) -> str:
        return self.join(grid, "weights", f"compressor={compressor}", f"{config_hash}.pt")

    def results_glob(self, grid: str | None = None) -> str:
        return self.join(grid or "*", "results", "**", "*.parquet")

    def laws_key(self, grid: str) -> str:
        return self.join(grid, "laws", "laws.parquet")

    def laws_glob(self, grid: str | None = None) -> str:
        return self.join(grid or "*", "laws", "laws.parquet")

    def draws_key(self, grid: str) -> str:
        return self.join(grid, "laws", "draws.parquet")

    def draws_glob(self, grid: str | None = None) -> str:
        return self.join(grid or "*", "laws", "draws.parquet")

    def heldout_key(self, grid: str) -> str:
        return self.join(grid, "laws", "heldout.parquet")

    def heldout_glob(self, grid: str | None = None) -> str:
        return self.join(grid or "*", "laws", "heldout.parquet")

    def plots_dir(self, grid: str) -> str:
        return self.join(grid, "plots")

    # ---- I/O --------------------------------------------------------------------------
    def _s3(self):
        import boto3
        from botocore.config import Config

        # Credentials come from the AWS chain (env, profile, instance role); the endpoint
        # from AWS_ENDPOINT_URL when set. Retries are bounded: a store that stays down
        # fails the write (and the trial) within seconds instead of hanging it.
        config = Config(
            retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}, connect_timeout=3, read_timeout=30
        )
        with _CLIENT_LOCK:  # boto3's default session is not thread-safe; its clients are
            return boto3.client("s3", endpoint_url=s3_endpoint(), config=config)

    @staticmethod
    def _split(key: str) -> tuple[str, str]:
        parsed = urlparse(key)
        return parsed.netloc, parsed.path.lstrip("/")

    def error(self, action: str, err: BaseException, kind: type[StoreError] = StoreError) -> StoreError:
        """`err` (a botocore, pyarrow, DuckDB or OS error) as a StoreError naming this store,
        what was being done and the cause, on one line. A connection that failed was retried
        (S3_ATTEMPTS in all, boto3's backoff) before it got here; an S3 error answer was not."""
        if isinstance(err, StoreError):
            return err
        retried = ""
        if self.is_s3:
            from botocore.exceptions import BotoCoreError

            if isinstance(err, BotoCoreError):
                retried = f" after {S3_ATTEMPTS} attempts"
        return kind(f"store {self.uri}: could not {action}{retried}: {one_line(err)}")

    def _io_errors(self) -> tuple[type[BaseException], ...]:
        """What a read or write of this store raises when the store fails it."""
        if not self.is_s3:
            return (OSError,)
        from botocore.exceptions import BotoCoreError, ClientError

        return OSError, BotoCoreError, ClientError

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one whole object: a single PUT on S3 (all or nothing), write-then-rename
        locally. Raises StoreWriteError when the store cannot be reached."""
        if self.is_s3:
            bucket, path = self._split(key)
            try:
                self._s3().put_object(Bucket=bucket, Key=path, Body=data)
            except self._io_errors() as err:
                raise StoreWriteError(
                    f"store {self.uri}: could not write {key} after {S3_ATTEMPTS} attempts ({one_line(err)}); "
                    "nothing was written; once the store is reachable, `tokenscale resume` redoes it"
                ) from None
            return
        try:
            write_atomically(key, lambda f: f.write(data))  # readers see the old object or the new one
        except OSError as err:
            raise self.error(f"write {key} (nothing was written)", err, StoreWriteError) from None

    def get_bytes(self, key: str) -> bytes:
        """One whole object; StoreError naming the store and the cause when it cannot be read."""
        try:
            if self.is_s3:
                bucket, path = self._split(key)
                return self._s3().get_object(Bucket=bucket, Key=path)["Body"].read()
            return Path(key).read_bytes()
        except self._io_errors() as err:
            raise self.error(f"read {key}", err) from None

    def exists(self, key: str) -> bool:
        if self.is_s3:
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, path = self._split(key)
            try:
                self._s3().head_object(Bucket=bucket, Key=path)
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise self.error(f"check {key}", err) from None
            except BotoCoreError as err:
                raise self.error(f"check {key}", err) from None
        try:
            return Path(key).exists()
        except OSError as err:
            raise self.error(f"check {key}", err) from None

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys under a prefix (full URIs), sorted; StoreError when the store cannot be listed."""
        try:
            if self.is_s3:
                bucket, path = self._split(prefix.rstrip("/") + "/")
                paginator = self._s3().get_paginator("list_objects_v2")
                keys = [
                    f"s3://{bucket}/{obj['Key']}"
                    for page in paginator.paginate(Bucket=bucket, Prefix=path)
                    for obj in page.get("Contents", [])
                ]
            else:
                root = Path(prefix)
                keys = [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []
        except self._io_errors() as err:
            raise self.error(f"list {prefix}", err) from None
        return sorted(k for k in keys if k.endswith(suffix) and not Path(k).name.startswith("."))

    def grids(self) -> list[str]:
        """Grids that have at least one result."""
        if self.is_s3:
            keys = self.list(self.uri, ".parquet")
            base = self.uri.rstrip("/") + "/"
            return sorted({k[len(base):].split("/")[0] for k in keys if "/results/" in k})
        root = Path(self.uri)
        try:
            return sorted(p.name for p in root.iterdir() if (p / "results").is_dir()) if root.exists() else []
        except OSError as err:
            raise self.error(f"list the grids in {self.uri}", err) from None

    def write_table(self, key: str, rows: Iterable[dict], schema: pa.Schema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(list(rows), schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.put_bytes(key, buffer.getvalue())

    def read_table(self, key: str) -> pa.Table:
        """One parquet object; StoreError when it cannot be read or is not parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.get_bytes(key)
        try:
            return pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as err:
            raise self.error(f"read {key} as parquet", err) from None

    # ---- the record kinds ---------------------------------------------------------
    def write_results(self, grid: str, compressor: str, config_hash: str, rows: list[dict]) -> str:
        if not rows:
            raise ValueError("a finished trial must write at least one result row")
        key = self.result_key(grid, compressor, config_hash)
        self.write_table(key, rows, arrow_schema("RESULT_SCHEMA"))
        return key

    def has_result(self, grid: str, compressor: str, config_hash: str) -> bool:
        return self.exists(self.result_key(grid, compressor, config_hash))

    def _read_folder(self, folder: str, schema: str) -> pa.Table:
        """Every parquet object under `folder`, conformed to `schema` (by name) and
        concatenated; empty when there is none."""
        import pyarrow as pa

        keys = self.list(folder, ".parquet")
        tables = [conform(self.read_table(k), arrow_schema(schema)) for k in keys]
        return pa.concat_tables(tables) if tables else arrow_schema(schema).empty_table()

    def read_results(self, grid: str) -> pa.Table:
        return self._read_folder(self.join(grid, "results"), "RESULT_SCHEMA")

    def write_curve(self, grid: str, compressor: str, config_hash: str, rows: list[dict]) -> str:
        """A trial's curve (CURVE_SCHEMA rows), one object keyed by its config hash: write it
        before the trial's result (the result is the commit marker); a retried trial
        overwrites it."""
        key = self.curve_key(grid, compressor, config_hash)
        self.write_table(key, rows, arrow_schema("CURVE_SCHEMA"))
        return key

    def read_curves(self, grid: str) -> pa.Table:
        """Every stored curve of `grid` (CURVE_SCHEMA); empty when it has none."""
        return self._read_folder(self.join(grid, "curves"), "CURVE_SCHEMA")

    def write_laws(self, grid: str, rows: list[dict]) -> str:
        key = self.laws_key(grid)
        self.write_table(key, rows, arrow_schema("LAW_SCHEMA"))
        return key

    def read_laws(self, grid: str | None = None) -> pa.Table:
        import pyarrow as pa

        grids = [grid] if grid else self.grids()
        tables = [conform(self.read_table(self.laws_key(g)), arrow_schema("LAW_SCHEMA")) for g in grids if self.exists(self.laws_key(g))]
        return pa.concat_tables(tables) if tables else arrow_schema("LAW_SCHEMA").empty_table()

    def write_draws(self, grid: str, rows: list[dict]) -> str:
        """The fit's bootstrap draws, one object (write it before the laws it belongs to)."""
        key = self.draws_key(grid)
        self.write_table(key, rows, arrow_schema("DRAW_SCHEMA"))
        return key

    def write_heldout(self, grid: str, rows: list[dict]) -> str:
        """The held-out LLMs' observed vs predicted errors of one fit (before its laws)."""
        key = self.heldout_key(grid)
        self.write_table(key, rows, arrow_schema("HELDOUT_SCHEMA"))
        return key

    def read_heldout(self, grid: str) -> pa.Table:
        key = self.heldout_key(grid)
        schema = arrow_schema("HELDOUT_SCHEMA")
        return conform(self.read_table(key), schema) if self.exists(key) else schema.empty_table()

    def read_draws(self, grid: str) -> pa.Table:
        """The grid's draws (DRAW_SCHEMA); empty when it has none (not fitted, or fitted
        before draws were stored)."""
        key = self.draws_key(grid)
        return conform(self.read_table(key), arrow_schema("DRAW_SCHEMA")) if self.exists(key) else arrow_schema("DRAW_SCHEMA").empty_table()

    def laws_versions(self, grid: str | None = None) -> tuple[tuple, ...]:
        """(grid, version...) per grid with a laws object (or just `grid`), from a stat
        (local: inode, mtime, size) or a HEAD (S3: ETag, LastModified, size), without
        reading any parquet: a cheap identity for pollers. Every write of laws is one atomic
        rename / one PUT, so a refit always changes it."""
        if not self.is_s3:
            root = Path(self.uri)
            try:
                grids = [grid] if grid else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                out = []
                for g in grids:
                    try:
                        st = Path(self.laws_key(g)).stat()
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    out.append((g, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError as err:
                raise self.error("check the laws", err) from None
            return tuple(out)
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._s3()
        bucket, prefix = self._split(self.uri.rstrip("/") + "/")
        try:
            if grid:
                grids = [grid]
            else:  # one LIST with a delimiter names the grids without listing every result
                grids = [
                    p["Prefix"][len(prefix):].strip("/")
                    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
                    for p in page.get("CommonPrefixes", [])
                ]
            out = []
            for g in sorted(grids):
                try:
                    head = client.head_object(Bucket=bucket, Key=self._split(self.laws_key(g))[1])
                except ClientError as err:
                    if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                        continue
                    raise
                out.append((g, head.get("ETag"), str(head.get("LastModified")), head.get("ContentLength")))
            return tuple(out)
        except (BotoCoreError, ClientError) as err:
            raise self.error("check the laws", err) from None
