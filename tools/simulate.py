"""Compare scheduling policies on a sample of VirNucPro's size, in simulated time, for a given set of GPUs.

    python tools/simulate.py --gpus "RTX 3090,RTX 4090" [--files 1760] [--true "RTX 4090=1.8"]

Runs the broker's own scheduler core through broker.simulator, so a policy
measured here is the policy the broker runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from broker.reports import makespan_lower_bound
from broker.simulator import SimJob, SimWorker, simulate
from virnucpro.pipeline.gpu_weights import load_weight_table

# One 10,000-sequence protein file (mean 51 aa) and the RTX 4090's ESM-2 time for it (docs/method.md).
FILE_RESIDUES = 510_000
ESM_4090_SECONDS = 31.0
POLICIES = (("equal split (the old static one)", False, False), ("--weighted", True, False),
            ("--weighted --steal", True, True))


def sample_costs(files: int, seed: int) -> list[int]:
    """File sizes of a split sample: full files within 10% of each other, the last one partial."""
    rng = random.Random(seed)
    costs = [int(FILE_RESIDUES * rng.uniform(0.9, 1.1)) for _ in range(files)]
    costs[-1] = int(costs[-1] * rng.uniform(0.05, 1.0))
    return costs


def compare(gpus: Sequence[str], true_weights: dict[str, float], files: int, seed: int) -> list[dict[str, Any]]:
    """Makespan of each policy for these GPUs; true speeds from `true_weights`, else from the table."""
    table = load_weight_table()
    predicted = [table.lookup(name) for name in gpus]
    truth = [true_weights.get(table.model_name(name), weight) for name, weight in zip(gpus, predicted, strict=True)]
    # Speeds in residues/s: the 4090's measured ESM-2 rate fixes the scale of weight 1.5.
    per_weight = FILE_RESIDUES / ESM_4090_SECONDS / 1.5
    speeds = [t * per_weight for t in truth]
    costs = sample_costs(files, seed)
    bound = makespan_lower_bound(costs, speeds)
    alone = sum(costs) / max(speeds)
    rows = []
    for label, weighted, steal in POLICIES:
        workers = [SimWorker(f"gpu{i}", weight, speed) for i, (weight, speed) in enumerate(zip(predicted, speeds, strict=True))]
        result = simulate(workers, [SimJob("sample", costs, weighted=weighted, steal=steal)],
                          horizon=100 * alone)
        makespan = result.reports["sample"]["makespan"]
        rows.append({"policy": label, "makespan_h": makespan / 3600, "ratio": makespan / bound,
                     "speedup": alone / makespan, "steals": result.reports["sample"]["steals"]})
    return rows


@click.command()
@click.option("--gpus", required=True, help='Comma-separated GPU names, e.g. "RTX 3090,RTX 4090".')
@click.option("--true", "true_text", default="", help='True weights where the table is wrong: "RTX 4090=1.8,H100=3.1".')
@click.option("--files", default=1760, show_default=True, help="ESM-2 files in the sample (1,760 = 22M reads).")
@click.option("--seed", default=1, show_default=True)
def main(gpus: str, true_text: str, files: int, seed: int) -> None:
    """Simulate one ESM-2 stage of a sample on these GPUs under each scheduling policy."""
    names = [name.strip() for name in gpus.split(",") if name.strip()]
    true_weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in true_text.split(","))):
        model, _, value = item.partition("=")
        try:
            true_weights[model.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: write MODEL=WEIGHT, e.g. \"RTX 4090=1.8\"") from None
    rows = compare(names, true_weights, files, seed)
    table = Table(title=f"{files} ESM-2 files on {', '.join(names)}", title_justify="left")
    for column in ("policy", "makespan", "÷ lower bound", "speed-up vs fastest GPU alone", "steals"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for row in rows:
        table.add_row(row["policy"], f"{row['makespan_h']:.2f} h", f"{row['ratio']:.3f}",
                      f"{row['speedup']:.2f}x", str(row["steals"]))
    Console().print(table)


if __name__ == "__main__":
    main()
