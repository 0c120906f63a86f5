"""What the benchmarks that write README tables share: the machine they ran on, and the table's place in README.md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import click


def machine() -> str:
    """CPU model, cores, Python, load average now and the date: the line a benchmark table is read with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load} at the start, "
            f"{time.strftime('%Y-%m-%d')}")


def replace_block(readme: Path, name: str, body: str) -> None:
    """Put `body` between the `<!-- NAME: start ... -->` and `<!-- NAME: end -->` lines of `readme`."""
    text = readme.read_text()
    start, end = f"<!-- {name}: start", f"<!-- {name}: end -->"
    if start not in text or end not in text:
        raise click.ClickException(f"{readme}: no {start} ... --> {end} block for the {name} table")
    before, rest = text.split(start, 1)
    marker, rest = rest.split("\n", 1)
    readme.write_text(f"{before}{start}{marker}\n{body}{end}{rest.split(end, 1)[1]}")
