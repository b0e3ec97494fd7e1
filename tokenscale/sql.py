"""DuckDB over the store: views `results`, `laws`, `draws`, `heldout` and `curves`, local or s3:// (httpfs, offline)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import duckdb

from .store import (
    CURVE_COLUMNS,
    DRAW_COLUMNS,
    HELDOUT_COLUMNS,
    LAW_COLUMNS,
    RESULT_COLUMNS,
    Store,
    StoreError,
    s3_endpoint,
)

_DUCK_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "double": "DOUBLE",
    "timestamp[us, tz=UTC]": "TIMESTAMPTZ",
    "bool": "BOOLEAN",
}


def _load_httpfs(con: duckdb.DuckDBPyConnection) -> None:
    """Load httpfs from the PyPI package `duckdb-extension-httpfs` (same version as duckdb):
    `INSTALL httpfs` needs DuckDB's extension server, which many clusters cannot reach."""
    import duckdb_extension_httpfs

    root = Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    files = sorted(root.glob("httpfs.duckdb_extension"))
    if not files:
        raise RuntimeError(
            f"no httpfs extension for duckdb {duckdb.__version__} in {root}: install "
            f"duckdb-extension-httpfs=={duckdb.__version__}"
        )
    con.execute(f"LOAD '{files[0]}'")


def _s3_secret(con: duckdb.DuckDBPyConnection) -> None:
    """Credentials from the AWS chain (env, profile, instance role) through botocore, the
    endpoint from AWS_ENDPOINT_URL; passed as parameters, never printed."""
    import boto3

    session = boto3.Session()
    creds = session.get_credentials()
    options = {"TYPE": "S3", "URL_STYLE": "path" if s3_endpoint() else "vhost"}
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        options["KEY_ID"], options["SECRET"] = frozen.access_key, frozen.secret_key
        if frozen.token:
            options["SESSION_TOKEN"] = frozen.token
    region = session.region_name or os.environ.get("AWS_REGION")
    if region:
        options["REGION"] = region
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options["ENDPOINT"] = parsed.netloc
        options["USE_SSL"] = "true" if parsed.scheme == "https" else "false"
    body = ", ".join(f"{k} {v}" if k in ("TYPE", "USE_SSL") else f"{k} '{v}'" for k, v in options.items())
    con.execute(f"CREATE OR REPLACE SECRET tokenscale_s3 ({body})")


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, schema: tuple[tuple[str, str], ...]) -> None:
    """A view with the record kind's columns (store.*_COLUMNS: name, Arrow type) and no rows."""
    columns = ", ".join(f"NULL::{_DUCK_TYPES[kind]} AS \"{column}\"" for column, kind in schema)
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {columns} WHERE false")


def store_fault(store: Store, err: duckdb.Error) -> StoreError | None:
    """A DuckDB error that is the store's doing (httpfs could not reach it or got an error
    answer, a store object could not be read) as a StoreError naming the store and the
    cause; None for an error in the statement itself (the caller's input)."""
    message = str(err)
    ours = isinstance(err, duckdb.HTTPException) or (
        isinstance(err, duckdb.IOException) and ("HTTP" in message or store.uri in message)
    ) or (not store.is_s3 and len(store.uri) > 1 and store.uri in message)
    if not ours:
        return None
    return store.error("read it through DuckDB", RuntimeError(message.split("\n")[0]))


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views over the store's parquet: `results` (one row per
    trial x benchmark), `laws` (one per fitted law), `draws` (each law's bootstrap
    parameter draws, one row per resample), `heldout` (held-out LLMs against the laws) and
    `curves` (each trial's training loss, one row per progress report). StoreError when
    the store cannot be listed or its objects read."""
    con = duckdb.connect(":memory:")
    try:
        _views(con, store)
    except duckdb.Error as err:
        con.close()
        raise store_fault(store, err) or err from None
    except BaseException:
        con.close()
        raise
    return con


def _views(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    if store.is_s3:
        _load_httpfs(con)
        _s3_secret(con)
    keys = store.list(store.uri, ".parquet")  # one listing for every view
    for view, glob, schema, present in (
        ("results", store.results_glob(), RESULT_COLUMNS, lambda key: "/results/" in key),
        ("laws", store.laws_glob(), LAW_COLUMNS, lambda key: key.endswith("/laws/laws.parquet")),
        ("draws", store.draws_glob(), DRAW_COLUMNS, lambda key: key.endswith("/laws/draws.parquet")),
        ("heldout", store.heldout_glob(), HELDOUT_COLUMNS, lambda key: key.endswith("/laws/heldout.parquet")),
        ("curves", store.curves_glob(), CURVE_COLUMNS, lambda key: "/curves/" in key),
    ):
        if any(present(key) for key in keys):
            # Columns live in the files; hive_partitioning off so the path's grid= and
            # compressor= segments never shadow them.
            con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{glob}', "
                "union_by_name = true, hive_partitioning = false)"
            )
        else:
            _empty_view(con, view, schema)


class ReadOnlyError(ValueError):
    """A statement that would write, refused without --write."""


_READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def query(store: Store, sql: str, read_only: bool = True):
    """Run one statement; returns (column names, rows). A statement DuckDB rejects raises
    its duckdb.Error; one that fails because the store could not be read, StoreError."""
    con = connect(store)
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1:
            raise ReadOnlyError(f"give exactly one SQL statement, got {len(statements)}")
        if read_only and statements[0].type not in _READ_STATEMENTS:
            raise ReadOnlyError(
                f"{statements[0].type.name} statements are refused: the store is read-only "
                "here (pass --write to allow statements that write)"
            )
        try:
            cursor = con.execute(sql)
            columns = [d[0] for d in cursor.description] if cursor.description else []
            return columns, cursor.fetchall() if columns else []
        except duckdb.Error as err:
            raise store_fault(store, err) or err from None
    finally:
        con.close()
