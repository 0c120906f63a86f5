"""Refining GPU weights from throughput logs: the cross-job fit, the weight file, the commands."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.records import LogRecord, TaskDone, WorkerSummary
from tools import refine_weights as refine_weights_tool
from virnucpro.pipeline.gpu_weights import BUILT_IN, GPU_WEIGHTS, load_weight_table
from virnucpro.weights.cli import weights
from virnucpro.weights.logs import read_throughput_logs
from virnucpro.weights.refine import refine_weights, result_rows, write_weight_file

RTX_3090 = "NVIDIA GeForce RTX 3090"
RTX_4090 = "NVIDIA GeForce RTX 4090"
H100 = "NVIDIA H100 80GB HBM3"
L40S = "NVIDIA L40S"
TRUE_SPEED = {RTX_3090: 1.0, RTX_4090: 1.8, H100: 3.6, L40S: 1.4}
RESIDUES_PER_S_AT_WEIGHT_1 = 40_000.0


@pytest.fixture(autouse=True)
def no_user_weight_file(monkeypatch):
    monkeypatch.delenv("VIRNUCPRO_GPU_WEIGHTS", raising=False)


def simulate_job(
    job: str,
    gpus: Sequence[str],
    rng: random.Random,
    stage: str = "esm",
    files: int = 30,
    noise: float = 0.1,
    start: float = 1.7e9,
) -> list[LogRecord]:
    """Records of one job: each file goes to the worker free first, its time off the true speed by `noise`."""
    workers = [(f"{job}-w{n}", gpu) for n, gpu in enumerate(gpus)]
    free = {name: start for name, _ in workers}
    totals = {name: [0, 0.0, 0] for name, _ in workers}
    records: list[LogRecord] = []
    for n in range(files):
        residues = rng.randint(20_000, 200_000)
        name, gpu = min(workers, key=lambda w: (free[w[0]], w[0]))
        seconds = residues / (TRUE_SPEED[gpu] * RESIDUES_PER_S_AT_WEIGHT_1) * rng.lognormvariate(0.0, noise)
        free[name] += seconds
        totals[name][0] += residues
        totals[name][1] += seconds
        totals[name][2] += 1
        records.append(TaskDone(
            time=free[name], job=job, stage=stage, worker=name, host="node1", gpu=gpu, predicted_weight=1.0,
            file=f"/data/{job}/part{n}.fa", sequences=residues // 300, residues=residues, seconds=seconds,
            residues_per_s=residues / seconds, stolen=n % 7 == 3,
        ))
    for name, gpu in workers:
        residues, busy, count = totals[name]
        records.append(WorkerSummary(
            time=max(free.values()), job=job, stage=stage, worker=name, gpu=gpu, predicted_weight=1.0,
            observed_weight=residues / busy / RESIDUES_PER_S_AT_WEIGHT_1, files=count, residues=residues,
            busy_seconds=busy, residues_per_s=residues / busy,
        ))
    return records


def write_log(path: Path, records: Sequence[LogRecord], extra_lines: Sequence[str] = ()) -> Path:
    with open(path, "w") as handle:
        for record in records:
            handle.write(record.to_line() + "\n")
        for line in extra_lines:
            handle.write(line)
    return path


JOBS_PER_PAIR = 6
FILES_PER_JOB = 200


def mixed_jobs(seed: int = 7, noise: float = 0.1) -> list[LogRecord]:
    """Jobs that pair 3090 with 4090, and 4090 with H100, but never 3090 with H100.

    Sized so that 5% is about five standard errors of the H100 figure: the
    accuracy bar then holds for any seed, not only the one used here.
    """
    rng = random.Random(seed)
    records: list[LogRecord] = []
    for n in range(JOBS_PER_PAIR):
        start = 1.7e9 + 10_000 * n
        records += simulate_job(f"a{n}", [RTX_3090, RTX_3090, RTX_4090, RTX_4090], rng, noise=noise,
                                files=FILES_PER_JOB, start=start)
        records += simulate_job(f"b{n}", [RTX_4090, RTX_4090, H100, H100], rng, noise=noise,
                                files=FILES_PER_JOB, start=start + 5_000)
    return records


def refined(records: Sequence[LogRecord], tmp_path: Path, **kwargs):
    log = read_throughput_logs([write_log(tmp_path / "throughput.jsonl", records)])
    return refine_weights(log, load_weight_table(), **kwargs)


def test_refined_weights_are_within_5_percent_of_true_speeds_from_jobs_that_never_pair_3090_with_h100(tmp_path):
    refinement = refined(mixed_jobs(), tmp_path)
    by_model = {m.model: m for m in refinement.models}
    assert refinement.baseline_observed
    assert by_model["RTX 3090"].refined == pytest.approx(1.0)
    for model, truth in (("RTX 3090", 1.0), ("RTX 4090", 1.8), ("H100", 3.6)):
        assert abs(by_model[model].refined / truth - 1) < 0.05, (model, by_model[model].refined, truth)
    assert by_model["RTX 4090"].jobs == 2 * JOBS_PER_PAIR and by_model["H100"].jobs == JOBS_PER_PAIR
    assert refinement.jobs_used == 2 * JOBS_PER_PAIR and refinement.jobs_single_model == 0


def test_fit_is_exact_on_noiseless_logs_including_three_model_jobs_and_chained_pairs(tmp_path):
    rng = random.Random(1)
    records = (
        simulate_job("j1", [RTX_3090, RTX_4090], rng, noise=0.0)
        + simulate_job("j2", [L40S, RTX_4090], rng, noise=0.0)
        + simulate_job("j3", [L40S, H100], rng, noise=0.0)
        + simulate_job("j4", [RTX_3090, RTX_4090, H100], rng, noise=0.0)
    )
    weights = refined(records, tmp_path).weights
    assert weights["RTX 3090"] == pytest.approx(1.0)
    assert weights["RTX 4090"] == pytest.approx(1.8)
    assert weights["H100"] == pytest.approx(3.6)
    assert weights[L40S] == pytest.approx(1.4)


def test_spread_is_a_small_standard_error_and_zero_for_the_baseline(tmp_path):
    by_model = {m.model: m for m in refined(mixed_jobs(), tmp_path).models}
    assert by_model["RTX 3090"].spread == pytest.approx(0.0, abs=1e-9)
    for model in ("RTX 4090", "H100"):
        assert 0.0 < by_model[model].spread < 0.02
    # H100 is reached only through the 4090, so its uncertainty adds up along the chain.
    assert by_model["H100"].spread > by_model["RTX 4090"].spread


def test_spread_comes_from_file_scatter_when_one_job_leaves_no_residual(tmp_path):
    records = simulate_job("only", [RTX_3090, RTX_4090], random.Random(3))
    by_model = {m.model: m for m in refined(records, tmp_path).models}
    assert 0.0 < by_model["RTX 4090"].spread < 0.1


def test_jobs_with_a_single_gpu_model_are_skipped_and_counted(tmp_path):
    rng = random.Random(5)
    records = (
        simulate_job("mixed", [RTX_3090, RTX_4090], rng)
        + simulate_job("solo1", [H100, H100], rng)
        + simulate_job("solo2", [RTX_3090], rng)
    )
    refinement = refined(records, tmp_path)
    assert (refinement.jobs_used, refinement.jobs_single_model) == (1, 2)
    assert refinement.weights["H100"] == GPU_WEIGHTS["H100"]


def test_models_never_observed_keep_their_current_weight(tmp_path):
    refinement = refined(mixed_jobs(), tmp_path)
    for model in ("A100", "RTX A6000", "V100 16GB", "V100 32GB", "RTX 3080", "RTX 4080"):
        assert refinement.weights[model] == GPU_WEIGHTS[model]
    unobserved = [m for m in refinement.models if m.model == "A100"][0]
    assert (unobserved.jobs, unobserved.files, unobserved.spread, unobserved.change) == (0, 0, None, 0.0)


def test_without_the_baseline_observed_the_current_tables_scale_is_kept(tmp_path):
    rng = random.Random(6)
    records = [r for n in range(3) for r in simulate_job(f"b{n}", [RTX_4090, H100], rng)]
    refinement = refined(records, tmp_path)
    assert not refinement.baseline_observed
    w4090, wh100 = refinement.weights["RTX 4090"], refinement.weights["H100"]
    assert math.sqrt(w4090 * wh100) == pytest.approx(math.sqrt(GPU_WEIGHTS["RTX 4090"] * GPU_WEIGHTS["H100"]))
    assert wh100 / w4090 == pytest.approx(2.0, rel=0.05)
    assert refinement.weights["RTX 3090"] == 1.0


def test_baseline_option_names_the_model_that_becomes_one(tmp_path):
    refinement = refined(mixed_jobs(), tmp_path, baseline="NVIDIA GeForce RTX 4090")
    assert refinement.baseline == "RTX 4090"
    assert refinement.weights["RTX 4090"] == pytest.approx(1.0)
    assert refinement.weights["H100"] == pytest.approx(2.0, rel=0.05)


def test_stage_filter_keeps_only_that_stages_jobs_and_all_includes_synthetic(tmp_path):
    rng = random.Random(8)
    records = (
        simulate_job("e", [RTX_3090, RTX_4090], rng, stage="esm")
        + simulate_job("d", [RTX_4090, H100], rng, stage="dnabert")
        + simulate_job("s", [RTX_3090, H100], rng, stage="synthetic")
    )
    esm = refined(records, tmp_path, stage="esm")
    assert (esm.jobs_used, esm.jobs_other_stage) == (1, 2)
    assert esm.weights["H100"] == GPU_WEIGHTS["H100"]
    everything = refined(records, tmp_path, stage="all")
    assert (everything.jobs_used, everything.jobs_other_stage) == (3, 0)
    with pytest.raises(ValueError, match="stage must be one of"):
        refined(records, tmp_path, stage="synthetic")


def test_classify_jobs_are_left_out_since_their_files_run_on_the_cpu(tmp_path):
    rng = random.Random(10)
    records = simulate_job("e", [RTX_3090, H100], rng, stage="esm")
    # Classify files take as long beside the H100 as beside the 3090: a CPU, not the GPU, did the work.
    cpu_bound = [dataclasses.replace(r, seconds=r.residues / 1000, residues_per_s=1000.0) if isinstance(r, TaskDone)
                 else r for r in simulate_job("c", [RTX_3090, H100], rng, stage="classify")]
    with_classify = refined(records + cpu_bound, tmp_path, stage="all")
    assert (with_classify.jobs_used, with_classify.jobs_other_stage) == (1, 1)
    assert with_classify.weights == refined(records, tmp_path, stage="all").weights


def test_gpu_unknown_to_the_table_is_fitted_under_its_device_name_and_reads_back(tmp_path):
    rng = random.Random(9)
    records = [r for n in range(3) for r in simulate_job(f"j{n}", [RTX_3090, L40S], rng)]
    refinement = refined(records, tmp_path)
    assert abs(refinement.weights[L40S] / 1.4 - 1) < 0.05
    table = load_weight_table(write_weight_file(tmp_path / "w.toml", refinement.weights))
    assert table.lookup(L40S) == pytest.approx(refinement.weights[L40S], rel=1e-3)


def test_result_rows_give_current_refined_change_jobs_files_and_spread(tmp_path):
    records = mixed_jobs()
    refinement = refined(records, tmp_path)
    rows = {row[0]: row for row in result_rows(refinement)}
    model, current, new, change, jobs, files, spread = rows["H100"]
    h100_files = sum(isinstance(r, TaskDone) and r.gpu == H100 for r in records)
    assert (current, jobs, files) == ("2.50", str(JOBS_PER_PAIR), str(h100_files))
    h100 = [m for m in refinement.models if m.model == "H100"][0]
    assert new == f"{h100.refined:.3f}" and change == f"{(h100.refined / 2.5 - 1) * 100:+.1f}%"
    assert spread.startswith("±") and spread.endswith("%")
    assert rows["A100"][2:] == ("1.20", "", "0", "0", "")


def test_weight_file_round_trips_through_load_weight_table(tmp_path):
    weights = {"RTX 3090": 1.0, "RTX 4090": 1.8034, "H100 80GB HBM3": 3.61, 'Odd "quoted" GPU\\X': 0.5}
    path = write_weight_file(tmp_path / "weights.toml", weights, header=["made by a test"])
    assert path.read_text().startswith("# made by a test\n[weights]\n")
    table = load_weight_table(path)
    for key, weight in weights.items():
        assert table.weights[key] == pytest.approx(weight, rel=1e-3)
        assert table.sources[key] == str(path)
    assert table.lookup("NVIDIA H100 80GB HBM3") == pytest.approx(3.61)


def test_weight_file_refuses_a_non_positive_weight_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="'H100'.*positive"):
        write_weight_file(tmp_path / "w.toml", {"RTX 3090": 1.0, "H100": 0.0})
    assert list(tmp_path.iterdir()) == []


def _rows_with(output: str, model: str) -> list[str]:
    return [line for line in output.splitlines() if f" {model} " in line]


def test_weights_show_lists_every_built_in_entry_with_its_source():
    result = CliRunner().invoke(weights, ["show"])
    assert result.exit_code == 0, result.output
    assert "Weight file: none" in result.output
    for model, weight in GPU_WEIGHTS.items():
        (line,) = _rows_with(result.output, model)
        assert f"{weight:.2f}" in line and BUILT_IN in line


def test_weights_show_names_the_override_file_for_its_entries(tmp_path, monkeypatch):
    path = tmp_path / "site.toml"
    path.write_text('[weights]\n"RTX 4090" = 1.7\n"L40S" = 1.4\n')
    for args in (["show", "--gpu-weights", str(path)], ["show"]):
        if args == ["show"]:
            monkeypatch.setenv("VIRNUCPRO_GPU_WEIGHTS", str(path))
        result = CliRunner().invoke(weights, args)
        assert result.exit_code == 0, result.output
        assert f"Weight file: {path}" in result.output
        (line,) = _rows_with(result.output, "RTX 4090")
        assert "1.70" in line and str(path) in line
        (line,) = _rows_with(result.output, "L40S")
        assert "1.40" in line and str(path) in line
        (line,) = _rows_with(result.output, "H100")
        assert BUILT_IN in line


def test_weights_show_reports_a_broken_weight_file_naming_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[weights]\n'H100' = -1\n")
    result = CliRunner().invoke(weights, ["show", "--gpu-weights", str(path)])
    assert result.exit_code != 0
    assert str(path) in result.output and "positive" in result.output


def test_weights_refine_measures_change_against_the_current_file(tmp_path):
    current = tmp_path / "current.toml"
    current.write_text('[weights]\n"RTX 4090" = 1.8\n"H100" = 3.6\n')
    log = write_log(tmp_path / "log.jsonl", mixed_jobs())
    result = CliRunner().invoke(weights, ["refine", str(log), "--current", str(current)])
    assert result.exit_code == 0, result.output
    (line,) = _rows_with(result.output, "H100")
    assert "3.60" in line
    assert "Pass --out FILE" in result.output


def test_refine_tool_runs_on_a_log_and_writes_a_weight_file(tmp_path, monkeypatch):
    lines = ["{truncated\n", json.dumps({"event": "heartbeat"}) + "\n"]
    records = mixed_jobs() + simulate_job("solo", [H100], random.Random(1))
    log = write_log(tmp_path / "log.jsonl", records, lines)
    out = tmp_path / "refined.toml"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(refine_weights_tool.refine, [str(log), "--out", str(out), "--stage", "esm"])
    assert result.exit_code == 0, result.output
    assert "Skipped 1 corrupt or truncated line(s)" in result.stdout
    assert f"{log}:{len(records) + 1}:" in result.stdout
    assert f"Jobs: {2 * JOBS_PER_PAIR} used, 1 skipped" in result.stdout
    table = load_weight_table(out)
    assert abs(table.weights["H100"] / 3.6 - 1) < 0.05
    assert table.weights["A100"] == GPU_WEIGHTS["A100"]
