"""The Ray Serve app: FastAPI ingress over `Advisor`, reloading laws from the store.

GET /optimal /frontier /laws /healthz (OpenAPI at /docs and /openapi.json). Nothing here
writes to the store or runs SQL.
"""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve

from tokenscale.store import Store

from .advisor import Advisor, BadRequest, load_snapshot

api = FastAPI(title="tokenscale", description="Inference-optimal VLM configs from fitted scaling laws.")


@api.exception_handler(BadRequest)
async def _bad_request(_: Request, err: BadRequest) -> JSONResponse:
    return JSONResponse(status_code=400, content={"error": str(err)})


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class TokenscaleApp:
    def __init__(self, store_uri: str, grid: str | None = None, reload_seconds: float = 5.0):
        self.store = Store(store_uri)
        self.grid = grid
        self.reload_seconds = reload_seconds
        self._advisor: Advisor | None = None
        self._lock = threading.Lock()
        self._reload()
        threading.Thread(target=self._reload_loop, daemon=True).start()

    def _reload(self) -> None:
        snapshot = load_snapshot(self.store, self.grid)
        if snapshot is not None and (self._advisor is None or snapshot.fitted_at != self._advisor.snapshot.fitted_at):
            with self._lock:
                self._advisor = Advisor(snapshot)

    def _reload_loop(self) -> None:
        # Hot reload: a refit writes a new laws object; serve it within reload_seconds.
        while True:
            time.sleep(self.reload_seconds)
            try:
                self._reload()
            except Exception:  # a store hiccup keeps the last good laws
                pass

    def advisor(self) -> Advisor:
        if self._advisor is None:
            raise BadRequest(f"no fitted laws in {self.store.uri} yet: run `tokenscale fit GRID` first")
        return self._advisor

    @api.get("/healthz")
    def healthz(self) -> dict:
        adv = self._advisor
        return {"status": "ok", "grid": adv.snapshot.grid if adv else None, "fitted_at": adv.snapshot.fitted_at if adv else None}

    @api.get("/optimal")
    def optimal(
        self,
        flops: float = Query(..., gt=0, description="inference budget per query in FLOPs, e.g. 2e12"),
        text_tokens: float = Query(0.0, ge=0, description="query length Q in tokens (0 = cached query)"),
        task: str = Query("reasoning", description="task family, e.g. reasoning or ocr"),
        compressor: str | None = Query(None, description="restrict to one compressor"),
        form: str = Query("product", pattern="^(product|sum)$"),
    ) -> dict:
        return self.advisor().optimal(flops, text_tokens, task, compressor, form)

    @api.get("/frontier")
    def frontier(
        self,
        task: str = Query("reasoning"),
        text_tokens: float = Query(0.0, ge=0),
        compressor: str | None = Query(None),
        form: str = Query("product", pattern="^(product|sum)$"),
    ) -> dict:
        return self.advisor().frontier(task, text_tokens, compressor, form)

    @api.get("/laws")
    def laws(self) -> list[dict]:
        return self.advisor().laws()


def start(store_uri: str, grid: str | None = None, host: str = "127.0.0.1", port: int = 8000, reload_seconds: float = 5.0) -> str:
    """Deploy on the running Ray; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(TokenscaleApp.bind(store_uri, grid, reload_seconds), name="tokenscale", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
