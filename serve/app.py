"""The Ray Serve app: FastAPI ingress over `Advisor`, hot-reloading laws from the store.

    GET /optimal   best grid candidate within a FLOP budget per query, with its CI and V*
    GET /frontier  Pareto frontier of the candidates
    GET /laws      fitted laws with their CIs
    GET /trials    best observed trials of a task family
    GET /healthz   200 while the process is up; says whether laws are loaded
    GET /noop      a constant (Ray Serve's own floor, for benchmarks/bench_serve.py)
    OpenAPI at /docs and /openapi.json.

Status codes: 200; 400 for a request that is well-formed but cannot be answered (unknown
task/compressor/form, budget below the cheapest candidate); 404 while the store has no
fitted laws (for the grid served) yet -- a 4xx, not 503, because it is the caller's store
that needs `tokenscale fit`, and the laws are picked up without a restart once written;
422 for parameters that fail validation (missing, wrong type, NaN/inf, out of range).
Every error body is JSON {"error": "what is wrong; what is accepted", ...}. No handler
lets an exception escape (that would be a 500): anything unexpected is logged and answered
400 with its type and message.

Nothing here writes to the store, runs SQL or fits anything: the store's laws, their
bootstrap draws and the results are only read, at (re)load. The `form` parameter accepts
`tokenscale.costs.FORMS`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenscale.costs import FORMS
from tokenscale.store import Store

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

log = logging.getLogger("ray.serve")

# The forms FastAPI accepts, from the one list. (A pattern on `str`, not a Literal: Serve's
# ingress resolves the handlers' annotations without this module's names.)
FORM_PATTERN = f"^({'|'.join(FORMS)})$"

# What each query parameter accepts: the OpenAPI descriptions and the 422 messages say the same.
ACCEPTED = {
    "flops": f"the inference budget per query in FLOPs: a finite number in (0, {MAX_FLOPS:g}], e.g. 2e12",
    "text_tokens": f"the query's text tokens Q: a finite number in [0, {MAX_TOKENS:g}] (0 = cached query)",
    "generated_tokens": f"tokens generated per answer G: a finite number in [0, {MAX_TOKENS:g}]",
    "task": "a task family that has fitted laws, e.g. reasoning or ocr (GET /laws lists them)",
    "compressor": "a compressor that has a fitted law for the task (GET /laws lists them); omit for all",
    "form": f"{' or '.join(FORMS)} (the scaling law's form)",
    "top": f"an integer from 1 to {MAX_TOP}",
}

api = FastAPI(
    title="tokenscale",
    description=(
        "Inference-optimal VLM configurations from fitted scaling laws E(N, V). Read-only: "
        "answers come from the laws and results in the store, reloaded when a refit lands.\n\n"
        f"Prediction CIs: {CI_METHOD}. Inference FLOPs per query: 2 N (Q + V + G), plus 2 N Q "
        "for a compressor that runs the LLM over the query (quecc)."
    ),
    version="1",
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


class OptimalAnswer(Point, AnswerHeader):
    budget_flops: float


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
    status: str
    ready: bool = Field(description="whether fitted laws are loaded (else the other endpoints answer 404)")
    grid: str | None
    fitted_at: str | None
    loaded_at: float | None
    reload_seconds: float
    last_reload_error: str | None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "cannot be answered as asked (e.g. unknown task, budget too small)"},
    404: {"model": ErrorBody, "description": "no fitted laws in the store yet: run `tokenscale fit GRID`"},
    422: {"model": ValidationBody, "description": "a parameter is missing, of the wrong type or out of range"},
}


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems, items = [], []
    for e in exc.errors():
        loc = [x if isinstance(x, int) else str(x) for x in e.get("loc", ())]
        name = str(loc[-1]) if loc else "request"
        got = "nothing" if e.get("type") == "missing" else _short(e.get("input"))
        problems.append(f"{name}: {e.get('msg')} (got {got}); accepted: {ACCEPTED.get(name, 'see /docs')}")
        items.append({"loc": loc, "msg": str(e.get("msg")), "type": str(e.get("type"))})
    return _error(422, "; ".join(problems), detail=items)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown path (404) or method (405): say what exists instead of {"detail": "Not Found"}
    message = f"{exc.detail}: {request.method} {request.url.path}; the API is GET /optimal, /frontier, /laws, /trials, /healthz (docs at /docs)"
    return _error(exc.status_code if exc.status_code < 500 else 400, message)


_NOOP = {"ok": True}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
@serve.ingress(api)
class TokenscaleApp:
    """One replica: a snapshot of the store's laws, swapped for a new one when they change."""

    def __init__(
        self,
        store_uri: str,
        grid: str | None = None,
        reload_seconds: float = 5.0,
        cis: bool = True,
    ):
        self.store = Store(store_uri)
        self.grid = grid
        self.reload_seconds = float(reload_seconds)
        self.cis = bool(cis)
        self._advisor: Advisor | None = None
        self._seen: tuple | None = None  # fingerprint of the laws last loaded (or found empty)
        self.last_reload_error: str | None = None
        self._stop = threading.Event()
        # The first load happens here, but a failure must not keep the replica from
        # starting (Serve would retry the constructor and the proxy would answer 503s):
        # the endpoints answer 404 until the reload loop succeeds.
        self._reload()
        threading.Thread(target=self._reload_loop, name="tokenscale-reload", daemon=True).start()

    def _reload(self) -> bool:
        """Load the store's laws if they changed since the last load; True when swapped."""
        try:
            fingerprint = laws_fingerprint(self.store, self.grid)
            if fingerprint == self._seen:
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
        except Exception as err:  # a store hiccup keeps the last good laws
            self.last_reload_error = f"{type(err).__name__}: {err}"[:500]
            log.warning("tokenscale: reload from %s failed: %s", self.store.uri, self.last_reload_error)
            return False

    def _reload_loop(self) -> None:
        # Hot reload: a refit writes a new laws object; it is served within about
        # reload_seconds (one poll: a stat or a HEAD) plus the time to load it.
        while not self._stop.wait(self.reload_seconds):
            self._reload()

    def __del__(self) -> None:
        # Serve calls __del__ when it stops a replica (scale-down, redeploy): end the poller
        self._stop.set()

    def _answer(self, compute: Callable[[Advisor], dict]) -> JSONResponse:
        # The response is rendered inside the try, so even a value JSON cannot carry
        # becomes a 4xx here instead of a 500 in FastAPI's serializer.
        try:
            advisor = self._advisor
            if advisor is None:
                where = f"grid {self.grid!r} in {self.store.uri}" if self.grid else self.store.uri
                raise NotReady(
                    f"no fitted laws in {where} yet: run `tokenscale fit GRID`; they are picked up "
                    f"within {self.reload_seconds:g}s of being written"
                )
            return JSONResponse(compute(advisor))
        except BadRequest as err:
            return _error(400, str(err))
        except NotReady as err:
            return _error(404, str(err))
        except Exception as err:  # never a 500; the log keeps the traceback
            log.exception("tokenscale: unexpected error answering a request")
            return _error(400, f"could not answer this request ({type(err).__name__}: {_short(str(err), 200)}); check the parameters against /docs")

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> JSONResponse:
        adv = self._advisor
        snap = adv.snapshot if adv else None
        return JSONResponse({
            "status": "ok",
            "ready": snap is not None,
            "grid": snap.grid if snap else None,
            "fitted_at": snap.fitted_at if snap else None,
            "loaded_at": snap.loaded_at if snap else None,
            "reload_seconds": self.reload_seconds,
            "last_reload_error": self.last_reload_error,
        })

    @api.get("/noop", include_in_schema=False)
    async def noop(self) -> JSONResponse:
        # a constant through the same deployment and response class: Serve's own floor
        return JSONResponse(_NOOP)

    @api.get("/optimal", response_model=OptimalAnswer, responses=ERRORS)
    async def optimal(
        self,
        flops: float = Query(..., gt=0, le=MAX_FLOPS, allow_inf_nan=False, description=ACCEPTED["flops"]),
        text_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["text_tokens"]),
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        compressor: str | None = Query(None, max_length=100, description=ACCEPTED["compressor"]),
        form: str = Query(FORMS[0], pattern=FORM_PATTERN, description=ACCEPTED["form"]),
        generated_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["generated_tokens"]),
    ) -> JSONResponse:
        return self._answer(lambda a: a.optimal(flops, text_tokens, task, compressor, form, generated_tokens))

    @api.get("/frontier", response_model=FrontierAnswer, responses=ERRORS)
    async def frontier(
        self,
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        text_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["text_tokens"]),
        compressor: str | None = Query(None, max_length=100, description=ACCEPTED["compressor"]),
        form: str = Query(FORMS[0], pattern=FORM_PATTERN, description=ACCEPTED["form"]),
        generated_tokens: float = Query(0.0, ge=0, le=MAX_TOKENS, allow_inf_nan=False, description=ACCEPTED["generated_tokens"]),
    ) -> JSONResponse:
        return self._answer(lambda a: a.frontier(task, text_tokens, compressor, form, generated_tokens))

    @api.get("/laws", response_model=LawsAnswer, responses=ERRORS)
    async def laws(self) -> JSONResponse:
        return self._answer(lambda a: a.laws())

    @api.get("/trials", response_model=TrialsAnswer, responses=ERRORS)
    async def trials(
        self,
        task: str = Query("reasoning", max_length=100, description=ACCEPTED["task"]),
        top: int = Query(10, ge=1, le=MAX_TOP, description=ACCEPTED["top"]),
    ) -> JSONResponse:
        return self._answer(lambda a: a.trials(task, top))


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
) -> str:
    """Deploy on the running Ray (bound to `host`, loopback by default); returns the base URL.

    `num_replicas` replicas of `num_cpus` CPUs each; every replica loads the store itself
    and polls it every `reload_seconds`. `cis=False` skips reading the stored draws
    (faster loads; the CI and share fields are then null). `name`/`route_prefix` let several stores be served
    side by side on one Serve instance (Serve has one HTTP proxy: host/port apply to the
    first `start` only)."""
    if not reload_seconds > 0:
        raise ValueError(f"reload_seconds={reload_seconds}: give a positive number of seconds")
    if num_replicas < 1 or num_cpus < 0 or max_ongoing_requests < 1:
        raise ValueError("num_replicas >= 1, num_cpus >= 0 and max_ongoing_requests >= 1 are required")
    serve.start(http_options={"host": host, "port": port})
    app = TokenscaleApp.options(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(store_uri, grid, reload_seconds, cis)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}" + ("" if route_prefix == "/" else route_prefix.rstrip("/"))
