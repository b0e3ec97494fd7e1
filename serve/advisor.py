"""The answers the Serve app gives, computed from the laws and results in the store.

Kept free of Ray and HTTP so it can be reasoned about (and tested) on its own; `app.py`
puts it behind FastAPI + Ray Serve.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from tokenscale.fitting.frontier import BudgetError, Candidate, Choice, choose, frontier
from tokenscale.fitting.grid_fit import candidates, laws_from_table
from tokenscale.fitting.law import Law

from tokenscale.store import Store


class BadRequest(ValueError):
    """The request cannot be answered as asked; the message says what is accepted."""


@dataclass
class Snapshot:
    grid: str
    laws: dict[tuple[str, str, str], tuple[dict, Law]]  # (task_family, compressor, form)
    candidates: list[Candidate]
    loaded_at: float
    fitted_at: str


def load_snapshot(store: Store, grid: str | None = None) -> Snapshot | None:
    """The newest fitted grid (or `grid`); None while the store has no laws yet."""
    table = store.read_laws(grid)
    if table.num_rows == 0:
        return None
    rows = laws_from_table(table)
    chosen = grid or max(rows, key=lambda r: r[0]["fitted_at"])[0]["grid"]
    rows = [r for r in rows if r[0]["grid"] == chosen]
    laws = {(row["task_family"], row["compressor"], row["form"]): (row, law) for row, law in rows}
    fitted_at = max(str(row["fitted_at"]) for row, _ in rows)
    return Snapshot(chosen, laws, candidates(store.read_results(chosen)), time.time(), fitted_at)


def _choice_json(choice: Choice) -> dict:
    c = choice.candidate
    return {
        "llm": c.llm,
        "llm_params": c.llm_params,
        "visual_tokens": c.visual_tokens,
        "compressor": c.compressor,
        "predicted_error": choice.predicted_error,
        "flops": choice.flops,
        "optimal_visual_tokens": choice.optimal_visual_tokens,
    }


class Advisor:
    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    @property
    def tasks(self) -> list[str]:
        return sorted({k[0] for k in self.snapshot.laws})

    def _laws_for(self, task: str, compressor: str | None, form: str) -> dict[str, Law]:
        if task not in self.tasks:
            raise BadRequest(f"unknown task {task!r}: accepted values are {', '.join(self.tasks)}")
        laws = {k[1]: law for k, (_, law) in self.snapshot.laws.items() if k[0] == task and k[2] == form}
        if not laws:
            forms = sorted({k[2] for k in self.snapshot.laws if k[0] == task})
            raise BadRequest(f"no {form!r} law for task {task!r}: accepted forms are {', '.join(forms)}")
        if compressor is not None:
            if compressor not in laws:
                raise BadRequest(f"unknown compressor {compressor!r} for task {task!r}: accepted values are {', '.join(sorted(laws))}")
            laws = {compressor: laws[compressor]}
        return laws

    def optimal(self, flops: float, text_tokens: float, task: str, compressor: str | None = None, form: str = "product") -> dict:
        if not math.isfinite(flops) or flops <= 0:
            raise BadRequest("flops must be a positive finite number of FLOPs per query, e.g. 2e12")
        if not math.isfinite(text_tokens) or text_tokens < 0:
            raise BadRequest("text_tokens must be a finite number >= 0 (0 = cached query)")
        laws = self._laws_for(task, compressor, form)
        try:
            choice = choose(laws, self.snapshot.candidates, flops, text_tokens)
        except BudgetError as err:
            raise BadRequest(str(err)) from None
        return {"grid": self.snapshot.grid, "task": task, "form": form, "text_tokens": text_tokens, "budget_flops": flops, **_choice_json(choice)}

    def frontier(self, task: str, text_tokens: float, compressor: str | None = None, form: str = "product") -> dict:
        if not math.isfinite(text_tokens) or text_tokens < 0:
            raise BadRequest("text_tokens must be a finite number >= 0 (0 = cached query)")
        laws = self._laws_for(task, compressor, form)
        points = [_choice_json(c) for c in frontier(laws, self.snapshot.candidates, text_tokens)]
        return {"grid": self.snapshot.grid, "task": task, "form": form, "text_tokens": text_tokens, "points": points}

    def laws(self) -> list[dict]:
        out = []
        for row, _ in self.snapshot.laws.values():
            out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items() if k != "fitted_at"} | {"fitted_at": str(row["fitted_at"])})
        return out

    def candidates(self) -> list[dict]:
        return [asdict(c) for c in self.snapshot.candidates]
