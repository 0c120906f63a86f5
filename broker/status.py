"""Rich tables for a broker status snapshot (workers, jobs, counters)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table


def _weight(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} s"


def _gauges(gauges: dict[str, float] | None) -> tuple[str, str]:
    if not gauges:
        return "n/a", "n/a"
    util = gauges.get("gpu_util")
    used, total = gauges.get("mem_used_mib"), gauges.get("mem_total_mib")
    return (
        "n/a" if util is None else f"{util:.0f}%",
        "n/a" if used is None or total is None else f"{used / 1024:.1f}/{total / 1024:.0f} GiB",
    )


def _running(worker: dict[str, Any]) -> str:
    """The file name a worker runs; only the job's id when the file belongs to another key's job."""
    if worker["running"]:
        return str(worker["running"]).rsplit("/", 1)[-1]
    return f"(job {worker['running_job']})" if worker.get("running_job") else ""


def status_tables(snapshot: dict[str, Any]) -> list[Table]:
    """The workers table, the jobs table and a counters line, ready to print."""
    workers = Table(title="workers", title_justify="left")
    for column in ("worker", "gpu", "weight", "observed", "res/s", "queue", "running", "for", "done",
                   "steals in/out", "gpu util", "gpu mem", "state"):
        workers.add_column(column, justify="right" if column not in ("worker", "gpu", "running", "state") else "left")
    for w in snapshot["workers"]:
        util, memory = _gauges(w.get("gauges"))
        workers.add_row(
            w["worker"], w["gpu"], _weight(w["predicted_weight"]), _weight(w["observed_weight"]),
            "n/a" if w.get("speed") is None else f"{w['speed']:,.0f}", str(w["queue"]),
            _running(w) + (" (overdue)" if w.get("overdue") else ""), _seconds(w["running_for"]),
            str(w["files_done"]), f"{w['steals_in']}/{w['steals_out']}", util, memory,
            "alive" if w["alive"] else "dead",
        )
    jobs = Table(title="jobs", title_justify="left")
    # A broker that authenticates its peers says which jobs the asking key submitted ("yours").
    submitters = any("yours" in j for j in snapshot["jobs"])
    for column in ("job", "stage", "state", "done", "failed", "running", "files", "steals", "backups won/started",
                   "wasted", "policy", "finish in", *(("submitted by",) if submitters else ())):
        jobs.add_column(column)
    for j in snapshot["jobs"]:
        backup = j.get("backup", False) and j["steal"]
        policy = ",".join(p for p, on in (("weighted", j["weighted"]), ("steal", j["steal"]), ("backup", backup))
                          if on) or "static"
        # An open job (not sealed) may still get files: its count is so far.
        state = j["state"] if j.get("sealed", True) or j["state"] != "running" else "open"
        jobs.add_row(j["job"], j["stage"], state, str(j["done"]), str(j["failed"]), str(j["running"]),
                     str(j["files"]), str(j["steals"]), f"{j.get('backups_won', 0)}/{j.get('backups', 0)}",
                     f"{j.get('wasted_seconds', 0.0):.1f} s", policy, _seconds(j.get("eta_seconds")),
                     *(("this key" if j.get("yours") else "another key",) if submitters else ()))
    counters = Table(title="dropped or discarded messages", title_justify="left")
    counters.add_column("reason")
    counters.add_column("count", justify="right")
    for reason, count in sorted(snapshot["counters"].items()):
        counters.add_row(reason, str(count))
    return [workers, jobs, counters]


def status_view(snapshot: dict[str, Any]) -> Group:
    """The whole status screen: a header line and the tables."""
    broker = snapshot.get("broker", {})
    header = f"broker {broker['address']}, up {broker['uptime']:.0f} s, log {broker['log']}" if broker else ""
    summary = snapshot.get("summary")
    if summary:
        header += (f"\n{summary['alive']} of {summary['workers']} workers alive, {summary['running_jobs']} of "
                   f"{summary['jobs']} jobs running")
        if snapshot.get("page") is not None and snapshot.get("pages", 1) > 1:
            header += f"; the living workers and most recent jobs shown (page 1 of {snapshot['pages']}, --all for all)"
    return Group(header, *status_tables(snapshot))


def render_status(snapshot: dict[str, Any], console: Console | None = None) -> None:
    """Print a status snapshot once."""
    (console or Console()).print(status_view(snapshot))
