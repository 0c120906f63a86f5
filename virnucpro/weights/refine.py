"""Refine the GPU weight table from the broker's throughput logs.

The broker appends one `task_done` record per finished file and one
`worker_summary` record per worker per job to a JSON Lines log (read by
virnucpro.weights.logs). Within one job, the GPU models that ran side by side give speed ratios; across jobs, one
log-weight per model is fitted to all those ratios at once by weighted least
squares, so a model seen only beside a 4090 in one job and only beside an H100
in another still gets one consistent weight.

Fit
    For job j and GPU model m (workers grouped by `WeightTable.match`, or the
    raw device name when the table does not know it), the pooled speed is
    s_jm = sum(residues) / sum(seconds) over the model's files in the job and
    R_jm = sum(residues) is the work behind it. Every pair (a, b) of models in
    a job gives one equation  x_a - x_b = log(s_ja / s_jb)  with weight
    w = R_ja * R_jb / sum_m R_jm. For two models this is the harmonic
    combination R_a R_b / (R_a + R_b), the inverse variance of the log ratio
    when a speed measured over R residues has variance proportional to 1 / R.
    With more models, dividing by the job's total makes the pairwise sum equal
    to the job-fixed-effect fit log s_jm = u_j + x_m, so a job with k models
    counts as k - 1 independent ratios, not k(k-1)/2.

Scale
    The log-weights are fixed only up to one constant per connected group of
    models (models linked through shared jobs). A group holding the baseline
    model puts it at 1.00; any other group keeps the current table's scale:
    the geometric mean of its refined weights equals that of its current ones.

Spread
    The standard error of each refined log-weight (about the relative
    standard error of the weight), from the fit's covariance sigma^2 (A'WA)^+.
    sigma^2 is the larger of two estimates in the same units: the weighted
    residuals of the fit (disagreement between jobs; needs more ratios than
    models) and the residue-weighted scatter of per-file speeds within each
    job and model (noise that one job alone already shows).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from broker.protocol import UNTIMED_STAGES
from broker.records import TaskDone
from virnucpro.atomic import write_text_atomically
from virnucpro.pipeline.gpu_weights import WeightTable, name_tokens
from virnucpro.weights.logs import ThroughputLog

STAGES = ("all", "dnabert", "esm")
DEFAULT_BASELINE = "RTX 3090"
RESULT_COLUMNS = ("model", "current", "refined", "change", "jobs", "files", "spread")


@dataclass(frozen=True)
class ModelRefinement:
    """One GPU model's current and refined weight, and the evidence behind it."""

    model: str
    current: float
    refined: float
    jobs: int
    files: int
    spread: float | None  # standard error of the refined log-weight; None when not estimable

    @property
    def change(self) -> float:
        return self.refined / self.current - 1.0


@dataclass(frozen=True)
class Refinement:
    """The refined table, per-model figures, and what was left out and why."""

    models: list[ModelRefinement]
    weights: dict[str, float]
    baseline: str
    baseline_observed: bool
    jobs_used: int
    jobs_single_model: int
    jobs_other_stage: int


@dataclass
class _Pool:
    residues: int = 0
    seconds: float = 0.0
    files: list[tuple[int, float]] = field(default_factory=list)

    def add(self, task: TaskDone) -> None:
        self.residues += task.residues
        self.seconds += task.seconds
        self.files.append((task.residues, task.seconds))


def _model_key(table: WeightTable, gpu: str) -> str:
    return table.match(gpu) or gpu


def _current_weight(table: WeightTable, model: str) -> float:
    return table.weights.get(model, 1.0)


def _components(n: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[root(a)] = root(b)
    return [root(i) for i in range(n)]


def _log_speed(residues: float, seconds: float) -> float | None:
    """log(residues / seconds), or None when the pair measures no usable speed."""
    if residues <= 0 or seconds <= 0:
        return None
    speed = residues / seconds
    return math.log(speed) if math.isfinite(speed) else None


def _file_scatter(pools: Iterable[_Pool]) -> tuple[float, int]:
    """Residue-weighted sum of squared per-file log-speed deviations, and its degrees of freedom."""
    total, dof = 0.0, 0
    for pool in pools:
        usable = [(r, _log_speed(r, s)) for r, s in pool.files]
        usable = [(r, speed) for r, speed in usable if speed is not None]
        if len(usable) < 2:
            continue
        weights = np.array([r for r, _ in usable], dtype=float)
        log_speeds = np.array([speed for _, speed in usable])
        mean = float(np.average(log_speeds, weights=weights))
        total += float(np.sum(weights * (log_speeds - mean) ** 2))
        dof += len(usable) - 1
    return total, dof


def _fit(
    models: list[str],
    rows: list[tuple[int, int, float, float]],
    ratio_jobs: Mapping[str, Mapping[str, _Pool]],
    baseline_key: str,
    current: WeightTable,
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Refined log-weight and its standard error per model, from pairwise rows (a, b, log ratio, weight)."""
    refined_log: dict[str, float] = {}
    spread: dict[str, float | None] = {}
    n = len(models)
    design = np.zeros((len(rows), n))
    target = np.empty(len(rows))
    weight = np.empty(len(rows))
    for r, (a, b, ratio, w) in enumerate(rows):
        design[r, a], design[r, b] = 1.0, -1.0
        target[r], weight[r] = ratio, w
    # Scaling all weights by one constant changes neither the solution nor
    # the standard errors, and keeps residue products (~1e12) well conditioned.
    scale = weight.max()
    root_w = np.sqrt(weight / scale)
    a_matrix, b_vector = design * root_w[:, None], target * root_w
    solution, _, rank, _ = np.linalg.lstsq(a_matrix, b_vector, rcond=None)

    estimates: list[float] = []
    fit_dof = sum(len(p) - 1 for p in ratio_jobs.values()) - rank
    if fit_dof > 0:
        residuals = b_vector - a_matrix @ solution
        estimates.append(float(residuals @ residuals) / fit_dof)
    scatter, scatter_dof = _file_scatter(p for pools in ratio_jobs.values() for p in pools.values())
    if scatter_dof > 0:
        estimates.append(scatter / scatter_dof / scale)
    sigma2 = max(estimates) if estimates else None
    unit_cov = np.linalg.pinv(a_matrix.T @ a_matrix)

    component = _components(n, ((a, b) for a, b, _, _ in rows))
    for group in set(component):
        members = [i for i in range(n) if component[i] == group]
        anchor = np.zeros(n)
        if baseline_key in models and models.index(baseline_key) in members:
            anchor[models.index(baseline_key)] = 1.0
            offset = 0.0
        else:
            known = [i for i in members if models[i] in current.weights] or members
            anchor[known] = 1.0 / len(known)
            offset = sum(math.log(_current_weight(current, models[i])) for i in known) / len(known)
        for i in members:
            contrast = -anchor
            contrast[i] += 1.0
            refined_log[models[i]] = float(contrast @ solution) + offset
            variance = float(contrast @ unit_cov @ contrast)
            spread[models[i]] = math.sqrt(max(variance, 0.0) * sigma2) if sigma2 is not None else None
    return refined_log, spread


def refine_weights(
    log: ThroughputLog,
    current: WeightTable,
    baseline: str = DEFAULT_BASELINE,
    stage: Literal["all", "dnabert", "esm"] = "all",
) -> Refinement:
    """Fit one weight per GPU model to the speed ratios of every job in `log`.

    `stage` keeps only that stage's jobs; "all" keeps every stage, synthetic
    included, except classify, whose files run on the workers' CPUs and say
    nothing of their GPUs. Models never observed beside another model keep their current
    weight. See the module docstring for the fit, the scale and the spread.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    jobs: dict[str, dict[str, _Pool]] = defaultdict(lambda: defaultdict(_Pool))
    other_stage: set[str] = set()
    for task in log.tasks:
        if task.stage in UNTIMED_STAGES or stage != "all" and task.stage != stage:
            other_stage.add(task.job)
            continue
        jobs[task.job][_model_key(current, task.gpu)].add(task)
    other_stage -= set(jobs)

    # A model whose files took no measurable time (or held no residues) gives no speed.
    log_speeds: dict[str, dict[str, float]] = {}
    for job, pools in jobs.items():
        log_speeds[job] = {}
        for m, pool in pools.items():
            speed = _log_speed(pool.residues, pool.seconds)
            if speed is not None:
                log_speeds[job][m] = speed
    ratio_jobs = {job: {m: jobs[job][m] for m in speeds} for job, speeds in log_speeds.items() if len(speeds) >= 2}
    single_model = len(jobs) - len(ratio_jobs)

    models = sorted({m for pools in ratio_jobs.values() for m in pools})
    index = {m: i for i, m in enumerate(models)}
    rows: list[tuple[int, int, float, float]] = []
    for job, pools in ratio_jobs.items():
        names = sorted(pools)
        total = sum(pools[m].residues for m in names)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ratio = log_speeds[job][a] - log_speeds[job][b]
                rows.append((index[a], index[b], ratio, pools[a].residues * pools[b].residues / total))

    baseline_key = _model_key(current, baseline)
    refined_log, spread = _fit(models, rows, ratio_jobs, baseline_key, current) if rows else ({}, {})

    jobs_per_model: dict[str, int] = defaultdict(int)
    files_per_model: dict[str, int] = defaultdict(int)
    for pools in ratio_jobs.values():
        for m, pool in pools.items():
            jobs_per_model[m] += 1
            files_per_model[m] += len(pool.files)

    table_models = list(current.weights) + [m for m in models if m not in current.weights]
    result = [
        ModelRefinement(
            model=m,
            current=_current_weight(current, m),
            refined=math.exp(refined_log[m]) if m in refined_log else _current_weight(current, m),
            jobs=jobs_per_model.get(m, 0),
            files=files_per_model.get(m, 0),
            spread=spread.get(m),
        )
        for m in table_models
    ]
    result.sort(key=lambda r: (r.jobs == 0, -r.refined, r.model))
    return Refinement(
        models=result,
        weights={r.model: r.refined for r in result},
        baseline=baseline_key,
        baseline_observed=baseline_key in refined_log,
        jobs_used=len(ratio_jobs),
        jobs_single_model=single_model,
        jobs_other_stage=len(other_stage),
    )


def result_rows(refinement: Refinement) -> list[tuple[str, ...]]:
    """The result table as text, one row per model, columns as in RESULT_COLUMNS."""
    rows: list[tuple[str, ...]] = []
    for r in refinement.models:
        observed = r.jobs > 0
        rows.append((
            r.model,
            f"{r.current:.2f}",
            f"{r.refined:.3f}" if observed else f"{r.refined:.2f}",
            f"{r.change * 100:+.1f}%" if observed else "",
            str(r.jobs),
            str(r.files),
            f"±{r.spread * 100:.1f}%" if observed and r.spread is not None else "",
        ))
    return rows


def _weight_text(weight: float) -> str:
    # Four significant digits: the fit is not more precise, and the file stays readable.
    return repr(float(f"{weight:.4g}"))


def write_weight_file(path: str | Path, weights: Mapping[str, float], header: Sequence[str] = ()) -> Path:
    """Write a TOML weight file (`[weights]`, quoted keys) that `load_weight_table` reads.

    The file is written to a temporary name and renamed, so a reader never
    sees half a table.
    """
    path = Path(path)
    # A line break inside a comment would end it and leave the rest as invalid TOML.
    lines = [f"# {' '.join(line.splitlines())}" for line in header]
    lines.append("[weights]")
    for key, weight in weights.items():
        if not name_tokens(key):
            raise ValueError(f"weight key {key!r} names no device model; give a GPU model name")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of {key!r} is {weight!r}; weights must be positive numbers")
        # JSON string escapes (with raw non-ASCII) are valid TOML basic strings.
        lines.append(f"{json.dumps(key, ensure_ascii=False)} = {_weight_text(weight)}")
    text = "\n".join(lines) + "\n"
    return write_text_atomically(path, text)
