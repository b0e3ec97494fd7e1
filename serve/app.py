"""The Ray Serve app: FastAPI ingress over `Advisor`, hot-reloading laws from the store.

    GET /optimal   best grid candidate within a FLOP budget per query, with its CI, V*, the
                   share of bootstrap draws that choose it (p_optimal) and the runner-up
    GET /frontier  Pareto frontier of the candidates
    GET /laws      fitted laws with their CIs
    GET /trials    best observed trials of a task family
    GET /healthz   200 while the process is up: ready, the laws' fingerprint, last_reload_error
    GET /          the grid's report page (serve/report.py): figures, laws, trials, curves
    OpenAPI at /docs and /openapi.json.

Status codes. The caller's fault is a 4xx whose message names the parameter and what is
accepted: 422 for parameters that fail validation (missing, wrong type, NaN/inf, out of
range); 400 for a request that is well-formed but cannot be answered (unknown
task/compressor/form, budget below the cheapest candidate); 404 while the store has no
fitted laws (for the grid served) yet -- the caller's store needs `tokenscale fit`, and the
laws are picked up without a restart once written. Our own fault is a 5xx with a short
cause, logged with its traceback: 503 while no laws could be loaded because the store
cannot be read (the reload loop keeps trying), 500 for anything unexpected (a bug). Every
error body is JSON {"error": "...", ...}.

A replica keeps answering from its last good laws when a reload fails (the store is down,
an object is unreadable): /healthz then reports `last_reload_error`, and the next poll
that succeeds clears it and serves what it found.

The logic lives in `Replica`, a plain class (no Ray needed: tests drive it in process
through `build_api`); `deployment()` wraps it for Ray Serve, and a subclass can add routes
(benchmarks/bench_serve.py adds its no-op that way). Nothing here writes to the store, runs
SQL or fits anything: the store's laws, their bootstrap draws and the results are only
read, at (re)load. The `form` parameter accepts `tokenscale.costs.FORMS`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenscale.costs import FORMS
from tokenscale.store import Store, StoreError, one_line

from .advisor import (
    CI_METHOD,
    MAX_FLOPS,
    MAX_TOKENS,
    MAX_TOP,
    Advisor,
    BadRequest,
    NotReady,
    laws_fingerprint,
    load_snapshot,
)
from .report import build_report

# The report page is rebuilt when the laws reload, and otherwise at most this often (its
# trials' status and curves move while a grid runs).
PAGE_SECONDS = 30.0

TrialStatusFn = Callable[[Store, str], Any]
"""`(store, grid) -> statuses or None` for the report's trial table (the CLI passes the
orchestrator's `saved_grid_status`); None, or no function, lists the trials that have
results. Its store faults are the page's 503, anything else it raises a 500."""

log = logging.getLogger("ray.serve")

# The forms FastAPI accepts, from the one list. (A pattern on `str`, not a Literal: the
# handlers' annotations are resolved from this module's globals.)
FORM_PATTERN = f"^({'|'.join(FORMS)})$"

# What each query parameter accepts: the OpenAPI descriptions and the 422 messages say the same.
ACCEPTED = {
    "flops": f"the inference budget per query in FLOPs: a finite number in (0, {MAX_FLOPS:g}], e.g. 2e12",
    "text_tokens": f"the query's text tokens Q: a finite number in [0, {MAX_TOKENS:g}] (0 = cached query)",
    "generated_tokens": f"tokens generated per answer G: a finite number in [0, {MAX_TOKENS:g}]",
    "task": "a task family that has fitted laws, e.g. reasoning or ocr (GET /laws lists them)",
    "compressor": "a compressor that has a fitted law for the task (GET /laws lists them); omit for all",
    "form": f"{' or '.join(FORMS)} (the scaling law's form; default: the one the fit marks better for the task)",
    "top": f"an integer from 1 to {MAX_TOP}",
}

TITLE = "tokenscale"
DESCRIPTION = (
    "Inference-optimal VLM configurations from fitted scaling laws E(N, V). Read-only: "
    "answers come from the laws and results in the store, reloaded when a refit lands.\n\n"
    f"Prediction CIs: {CI_METHOD}. Inference FLOPs per query: 2 N (Q + V + G), plus 2 N Q "
    "for a compressor that runs the LLM over the query (quecc).\n\n"
    "Errors: 4xx when the request is at fault (the message names the parameter and what is "
    "accepted), 5xx when the service is (503: the store cannot be read and no laws are "
    "loaded; 500: an internal error, logged)."
)


# ---- response bodies (for the OpenAPI schema; handlers build plain dicts) ------------------


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and what is accepted")


class ValidationItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationBody(BaseModel):
    error: str = Field(description="what is wrong and what is accepted, per parameter")
    detail: list[ValidationItem]


class Point(BaseModel):
    llm: str | None
    llm_params: int = Field(description="N: the LLM's parameters as the grid declares them (else counted), what inference pays for")
    visual_tokens: int = Field(description="V: visual tokens per image")
    compressor: str | None
    predicted_error: float | None
    predicted_error_lo: float | None = Field(description="lower end of the prediction's CI; null when unavailable")
    predicted_error_hi: float | None = Field(description="upper end of the prediction's CI; null when unavailable")
    optimal_share: float | None = Field(
        description="share of the law's bootstrap draws in which this candidate is the choice at this budget; "
                    "null without stored draws")
    flops: float = Field(description="this candidate's inference FLOPs per query: 2 N (Q + V + G), + 2 N Q for quecc")
    optimal_visual_tokens: float | None = Field(description="V*: the continuous compute-optimal V at this budget")
    optimal_llm_params: float | None = Field(description="N*: the N that spends the budget at V*")


class AnswerHeader(BaseModel):
    """What every answer states about itself: which laws, which question."""

    grid: str
    fitted_at: str
    task: str
    form: str
    text_tokens: float
    generated_tokens: float
    ci_level: float | None


class RunnerUp(BaseModel):
    """The other candidate within the budget that the most bootstrap draws choose."""

    llm: str | None
    llm_params: int
    visual_tokens: int
    compressor: str | None
    predicted_error: float | None
    predicted_error_lo: float | None
    predicted_error_hi: float | None
    flops: float = Field(description="its inference FLOPs per query")


class OptimalAnswer(Point, AnswerHeader):
    budget_flops: float
    p_optimal: float | None = Field(
        description="share of the law's stored bootstrap draws in which the answer is the choice at this budget "
                    "(= optimal_share); null without stored draws")
    runner_up: RunnerUp | None = Field(
        description="the other candidate within the budget that is the choice in the most draws (ties, or no "
                    "draws: the next-lowest predicted error); null when no other candidate fits the budget")
    runner_up_p_optimal: float | None = Field(
        description="share of the draws in which the runner-up is the choice; null without draws or runner-up")


class FrontierAnswer(AnswerHeader):
    points: list[Point]


class LawsAnswer(BaseModel):
    grid: str
    fitted_at: str
    laws: list[dict[str, Any]]


class Trial(BaseModel):
    rank: int
    trial_id: str | None
    config_hash: str | None
    llm: str | None
    llm_params: int | None
    visual_tokens: int | None
    compressor: str | None
    seed: int | None
    mean_error: float
    mean_score: float | None
    benchmarks: int
    examples: int | None
    inference_flops: float | None
    finished_at: str | None


class TrialsAnswer(BaseModel):
    grid: str
    task: str
    top: int
    trials: list[Trial]


class Health(BaseModel):
    status: str = Field(description="ok, or degraded while the last reload failed (the last good laws are served)")
    ready: bool = Field(description="whether fitted laws are loaded (else the other endpoints answer 404, or 503 "
                                    "when the store could not be read)")
    grid: str | None
    fitted_at: str | None
    loaded_at: float | None
    laws_fingerprint: str | None = Field(description="identity of the laws object(s) served (from a stat or a "
                                                     "HEAD): it changes with every refit")
    reload_seconds: float
    last_reload_error: str | None = Field(description="why the last reload failed; null once one succeeds")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "cannot be answered as asked (e.g. unknown task, budget too small)"},
    404: {"model": ErrorBody, "description": "no fitted laws in the store yet: run `tokenscale fit GRID`"},
    422: {"model": ValidationBody, "description": "a parameter is missing, of the wrong type or out of range"},
    500: {"model": ErrorBody, "description": "an internal error of the service (not of the request); logged"},
    503: {"model": ErrorBody, "description": "no laws loaded because the store cannot be read; retried every reload"},
}


class Unavailable(RuntimeError):
    """No laws to answer from because the store could not be read: the service's fault."""


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


def internal_error(err: BaseException) -> JSONResponse:
    """A 500 for an exception we did not expect: a short cause, the traceback in the log."""
    log.error("tokenscale: internal error answering a request", exc_info=err)
    return _error(500, f"internal error in tokenscale, not a problem with the request "
                       f"({type(err).__name__}: {one_line(err, 200)}); the service log has the traceback")


def fingerprint_id(fingerprint: tuple | None) -> str | None:
    """A short stable string for a laws fingerprint (`advisor.laws_fingerprint`)."""
    if not fingerprint:
        return None
    return hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16]


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems, items = [], []
    for e in exc.errors():
        loc = [x if isinstance(x, int) else str(x) for x in e.get("loc", ())]
        name = str(loc[-1]) if loc else "request"
        got = "nothing" if e.get("type") == "missing" else _short(e.get("input"))
        problems.append(f"{name}: {e.get('msg')} (got {got}); accepted: {ACCEPTED.get(name, 'see /docs')}")
        items.append({"loc": loc, "msg": str(e.get("msg")), "type": str(e.get("type"))})
    return _error(422, "; ".join(problems), detail=items)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code >= 500:  # our fault: said as such, with its own status
        return _error(exc.status_code, f"{exc.detail} (an error of the service, not of the request)")
    # unknown path (404) or method (405): say what exists instead of {"detail": "Not Found"}
    message = f"{exc.detail}: {request.method} {request.url.path}; the API is GET /optimal, /frontier, /laws, /trials, /healthz (docs at /docs)"
    return _error(exc.status_code, message)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # the backstop for anything raised outside Replica.answer (which answers its own 500s)
    return internal_error(exc)


class Replica:
    """One replica: a snapshot of the store's laws, swapped for a new one when they change.

    Plain Python (no Ray): `deployment()` makes it a Serve deployment, `build_api` its
    FastAPI app. `poll=False` skips the reload thread (call `reload()` yourself)."""

    def __init__(
        self,
        store_uri: str,
        grid: str | None = None,
        reload_seconds: float = 5.0,
        cis: bool = True,
        poll: bool = True,
        trial_status: TrialStatusFn | None = None,
    ):
        self.store = Store(store_uri)
        self.grid = grid
        self.trial_status = trial_status
        self._page: tuple[tuple, float, str] | None = None  # (laws fingerprint, built at, html)
        self._page_lock = threading.Lock()
        self.reload_seconds = float(reload_seconds)
        self.cis = bool(cis)
        self._advisor: Advisor | None = None
        self._seen: tuple | None = None  # fingerprint of the laws last loaded (or found empty)
        self.last_reload_error: str | None = None
        self._stop = threading.Event()
        # The first load happens here, but a failure must not keep the replica from
        # starting (Serve would retry the constructor and the proxy would answer its own
        # 503s): the endpoints answer 503 (store unreadable) or 404 (no laws yet) until the
        # reload loop succeeds.
        self.reload()
        if poll:
            threading.Thread(target=self._reload_loop, name="tokenscale-reload", daemon=True).start()

    @property
    def advisor(self) -> Advisor | None:
        return self._advisor

    def reload(self) -> bool:
        """Load the store's laws if they changed since the last load; True when swapped.
        A failure keeps the last good laws and is reported in `last_reload_error`."""
        try:
            fingerprint = laws_fingerprint(self.store, self.grid)
            if fingerprint == self._seen:
                self.last_reload_error = None  # the store answers again, nothing new
                return False
            snapshot = None
            if fingerprint:  # no laws object at all: nothing to read
                snapshot = load_snapshot(self.store, self.grid, cis=self.cis, fingerprint=fingerprint)
            self._seen = fingerprint
            self.last_reload_error = None
            if snapshot is None:
                return False
            self._advisor = Advisor(snapshot)  # one reference swap: requests see old or new
            log.info("tokenscale: serving laws of grid %s fitted at %s", snapshot.grid, snapshot.fitted_at)
            return True
        except StoreError as err:  # the store is down or refused: keep the last good laws
            self.last_reload_error = f"{type(err).__name__}: {one_line(err, 480)}"
            log.warning("tokenscale: reload from %s failed, serving the last good laws: %s", self.store.uri,
                        self.last_reload_error)
            return False
        except Exception as err:  # anything else is ours (or unreadable data): log the traceback too
            self.last_reload_error = f"{type(err).__name__}: {one_line(err, 480)}"
            log.exception("tokenscale: reload from %s failed, serving the last good laws", self.store.uri)
            return False

    def _reload_loop(self) -> None:
        # Hot reload: a refit writes a new laws object; it is served within about
        # reload_seconds (one poll: a stat or a HEAD) plus the time to load it.
        while not self._stop.wait(self.reload_seconds):
            self.reload()

    def close(self) -> None:
        """Stop the reload loop (Serve calls __del__ when it stops a replica)."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()

    def _where(self) -> str:
        return f"grid {self.grid!r} in {self.store.uri}" if self.grid else self.store.uri

    def answer(self, compute: Callable[[Advisor], dict]) -> JSONResponse:
        """`compute` on the current laws as a response: 400/404 when the request cannot be
        answered, 503 when no laws could be loaded, 500 (logged) for anything unexpected."""
        # The response is rendered inside the try: a value JSON cannot carry is our bug, a 500.
        try:
            advisor = self._advisor
            if advisor is None:
                if self.last_reload_error:
                    raise Unavailable(
                        f"no laws loaded: the store could not be read ({self.last_reload_error}); a fault of "
                        f"the service's store, retried every {self.reload_seconds:g}s"
                    )
                raise NotReady(
                    f"no fitted laws in {self._where()} yet: run `tokenscale fit GRID`; they are picked up "
                    f"within {self.reload_seconds:g}s of being written"
                )
            return JSONResponse(compute(advisor))
        except BadRequest as err:
            return _error(400, str(err))
        except NotReady as err:
            return _error(404, str(err))
        except Unavailable as err:
            return _error(503, str(err))
        except Exception as err:  # our fault, not the request's: 500 with the cause, traceback logged
            return internal_error(err)

    def page(self) -> HTMLResponse | JSONResponse:
        """The report page of the grid served (`serve/report.py`), rebuilt when the laws
        reloaded or after PAGE_SECONDS; the same status codes as the JSON endpoints."""
        try:
            advisor = self._advisor
            grid = advisor.snapshot.grid if advisor else self.grid
            if grid is None:
                return self.answer(lambda a: {})  # the JSON endpoints' 404 / 503 for "no laws"
            key = advisor.snapshot.fingerprint if advisor else ()
            with self._page_lock:  # one build at a time; the others wait for it
                if self._page is None or self._page[0] != key or time.monotonic() - self._page[1] > PAGE_SECONDS:
                    statuses = self.trial_status(self.store, grid) if self.trial_status else None
                    self._page = (key, time.monotonic(), build_report(self.store, grid, advisor, statuses))
                return HTMLResponse(self._page[2])
        except StoreError as err:
            return _error(503, f"the report could not be built: the store could not be read ({one_line(err, 480)})")
        except Exception as err:  # ours: 500 with the cause, traceback logged
            return internal_error(err)

    def health(self) -> dict:
        adv = self._advisor
        snap = adv.snapshot if adv else None
        return {
            "status": "degraded" if self.last_reload_error else "ok",
            "ready": snap is not None,
            "grid": snap.grid if snap else None,
            "fitted_at": snap.fitted_at if snap else None,
            "loaded_at": snap.loaded_at if snap else None,
            "laws_fingerprint": fingerprint_id(snap.fingerprint) if snap else None,
            "reload_seconds": self.reload_seconds,
            "last_reload_error": self.last_reload_error,
        }

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this once per replica, after __init__: the app's routes answer from self
        return build_api(self)


def build_api(replica: Replica) -> FastAPI:
    """The HTTP API over one replica (also usable without Ray, e.g. in process)."""
    api = FastAPI(title=TITLE, description=DESCRIPTION, version="1")
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)

    # a page for people, not part of the API: left out of /openapi.json (and so of its fuzzing)
    @api.get("/", response_class=HTMLResponse, response_model=None, include_in_schema=False)
    async def report() -> HTMLResponse | JSONResponse:
        return replica.page()

    @api.get("/healthz", response_model=Health)
    async def healthz() -> JSONResponse:
        return JSONResponse(replica.health())

    @api.get("/optimal", response_model=OptimalAnswer, responses=ERRORS)
    async def optimal(
        flops: float = Query(..., gt=0, le=MAX_FLOPS, allow_inf_nan=False, description=ACCEPTED["flops"]),
        text_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["text_tokens"]),
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        compressor: str | None = Query(None, max_length=100, description=ACCEPTED["compressor"]),
        form: str | None = Query(None, pattern=FORM_PATTERN, description=ACCEPTED["form"]),
        generated_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["generated_tokens"]),
    ) -> JSONResponse:
        return replica.answer(lambda a: a.optimal(flops, text_tokens, task, compressor, form, generated_tokens))

    @api.get("/frontier", response_model=FrontierAnswer, responses=ERRORS)
    async def frontier(
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        text_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["text_tokens"]),
        compressor: str | None = Query(None, max_length=100, description=ACCEPTED["compressor"]),
        form: str | None = Query(None, pattern=FORM_PATTERN, description=ACCEPTED["form"]),
        generated_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["generated_tokens"]),
    ) -> JSONResponse:
        return replica.answer(lambda a: a.frontier(task, text_tokens, compressor, form, generated_tokens))

    @api.get("/laws", response_model=LawsAnswer, responses=ERRORS)
    async def laws() -> JSONResponse:
        return replica.answer(lambda a: a.laws())

    @api.get("/trials", response_model=TrialsAnswer, responses=ERRORS)
    async def trials(
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        top: int = Query(10, ge=1, le=MAX_TOP, description=ACCEPTED["top"]),
    ) -> JSONResponse:
        return replica.answer(lambda a: a.trials(task, top))

    return api


def deployment(replica_class: type[Replica] = Replica) -> Any:
    """`replica_class` as a Ray Serve deployment whose replicas serve `build_api` (or the
    class's own `__serve_build_asgi_app__`)."""
    ingress = serve.ingress()(replica_class)  # the app is built per replica, bound to it
    return serve.deployment(name="TokenscaleApp", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)(ingress)


TokenscaleApp = deployment()


def start(
    store_uri: str,
    grid: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    reload_seconds: float = 5.0,
    *,
    num_replicas: int = 1,
    num_cpus: float = 0.1,
    max_ongoing_requests: int = 32,
    cis: bool = True,
    name: str = "tokenscale",
    route_prefix: str = "/",
    replica_class: type[Replica] = Replica,
    trial_status: TrialStatusFn | None = None,
) -> str:
    """Deploy on the running Ray (bound to `host`, loopback by default); returns the base URL.

    `num_replicas` replicas of `num_cpus` CPUs each; every replica loads the store itself
    and polls it every `reload_seconds`. `cis=False` skips reading the stored draws
    (faster loads; the CI and share fields are then null). `name`/`route_prefix` let several stores be served
    side by side on one Serve instance (Serve has one HTTP proxy: host/port apply to the
    first `start` only). `replica_class`: a subclass of `Replica` (e.g. with more routes).
    `trial_status`: where `GET /` reads each trial's status (see `Replica`)."""
    if not reload_seconds > 0:
        raise ValueError(f"reload_seconds={reload_seconds}: give a positive number of seconds")
    if num_replicas < 1 or num_cpus < 0 or max_ongoing_requests < 1:
        raise ValueError("num_replicas >= 1, num_cpus >= 0 and max_ongoing_requests >= 1 are required")
    serve.start(http_options={"host": host, "port": port})
    target = TokenscaleApp if replica_class is Replica else deployment(replica_class)
    app = target.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(store_uri, grid, reload_seconds, cis, trial_status=trial_status)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}" + ("" if route_prefix == "/" else route_prefix.rstrip("/"))
