"""`virnucpro predict` end to end, run as a user runs it: a subprocess of the installed command.

Every run uses the tiny models (built once per session in a private cache),
small inputs and a short worker timeout; every wait is bounded, so a hang
fails the test instead of blocking CI.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from virnucpro.client.local import LocalCluster
from virnucpro.pipeline.fasta import read_fasta
from virnucpro.pipeline.features import load_features
from virnucpro.pipeline.merge import merge_features

ROOT = Path(__file__).resolve().parents[2]
VIRNUCPRO = Path(sys.executable).with_name("virnucpro")
RESULTS = ("prediction_results.txt", "prediction_results_highestscore.csv")
RUN_TIMEOUT = 150  # seconds for one whole predict run on a loaded 2-core machine
# --sequences-per-file: about 10 file pairs from the input below, so that a kill lands mid-stage.
COMMON = ["--models", "tiny", "--expected-length", "500", "--sequences-per-file", "12", "--timeout", "60"]


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of every run: a session cache holding the tiny models, a private throughput log."""
    home = tmp_path_factory.mktemp("home")
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRNUCPRO_BROKER", "VIRNUCPRO_GPU_WEIGHTS")}
    environment.update(XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"), COLUMNS="160")
    from virnucpro.backends.tiny import ensure_tiny_models

    ensure_tiny_models(home / "cache" / "virnucpro" / "tiny-models")
    return environment


@pytest.fixture(scope="session")
def reads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "reads.fa"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_example_reads.py"), str(path), "--reads", "60"],
                   check=True, capture_output=True, timeout=60)
    return path


def predict(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VIRNUCPRO), "predict", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def start_predict(env: dict[str, str], *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([str(VIRNUCPRO), "predict", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def results(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in RESULTS}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def embedded(out: Path, stage: str = "dnabert") -> list[Path]:
    return sorted((out / "work" / stage).glob("output_*.pt"))


def children(pid: int) -> dict[int, str]:
    """Living child processes of `pid`: process id to command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"predict did not finish within {RUN_TIMEOUT} s:\n{output}") from None
    return process.returncode, output


def snapshot(out: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every finished split file, embedding and per-pair prediction file: changed if recomputed."""
    files = [*(out / "work").glob("nucleotide/*.fa"), *(out / "work").glob("protein/*.fa"),
             *embedded(out, "dnabert"), *embedded(out, "esm"), *(out / "work").glob("classify/output_*.tsv")]
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def reference(env: dict[str, str], reads: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The predictions of a plain run: two workers, no weights, no stealing."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run = predict(env, reads, "-o", out, "--workers", "2", *COMMON)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("mean nothing biologically") == 1
    assert "dnabert: per-worker throughput" in run.stderr and "esm: per-worker throughput" in run.stderr
    for stage in ("dnabert", "esm"):
        report = json.loads((out / "work" / stage / "run_report.json").read_text())
        assert report["precision"] == {"fp32": len(list((out / "work" / stage).glob("output_*.pt")))}
    assert not (out / "failed_files.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    frames = sum(1 for _ in (out / RESULTS[0]).open()) - 1
    assert (summary["reads"], summary["frames"], summary["exit_status"], summary["failures"]) == (60, frames, 0, [])
    assert set(summary["stage_seconds"]) == {"split", "dnabert", "esm", "classify", "total"}
    assert 0 < summary["stage_seconds"]["classify"] < summary["stage_seconds"]["total"]
    assert set(summary["jobs"]) == {"dnabert", "esm", "classify"}
    classify = json.loads((out / "work" / "classify" / "run_report.json").read_text())
    assert (classify["stage"], classify["done"], classify["failed"]) == ("classify", summary["file_pairs"], 0)
    return results(out)


@pytest.mark.parametrize("workers", [1, 3])
def test_weighted_stealing_with_one_or_three_workers_gives_byte_identical_predictions(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes], workers: int) -> None:
    keep = ["--keep-features"] if workers == 3 else []
    out = tmp_path / "out"
    run = predict(env, reads, "-o", out, "--workers", str(workers), "--weighted", "--steal", *keep, *COMMON)
    assert run.returncode == 0, run.stderr
    assert results(out) == reference
    merged = sorted((out / "work" / "merged").glob("output_*_merged.pt"))
    assert len(merged) == (len(embedded(out)) if keep else 0)
    for path in merged:
        k = path.name.split("_")[1]
        expected = merge_features(out / "work" / "dnabert" / f"output_{k}_DNABERT_S.pt",
                                  out / "work" / "esm" / f"output_{k}_ESM.pt")
        kept = load_features(path, "merged")
        assert kept.ids == expected.ids and torch.equal(kept.data, expected.data)


def test_killed_worker_mid_run_still_completes_with_the_same_predictions(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    process = start_predict(env, reads, "-o", out, "--workers", "2", "--worker-timeout", "2", "--steal", *COMMON)
    wait_for(lambda: embedded(out) or process.poll() is not None, 90, "the first DNABERT-S output")
    workers = [pid for pid, cmdline in children(process.pid).items() if " worker " in cmdline]
    assert len(workers) == 2, children(process.pid)
    os.kill(workers[0], signal.SIGKILL)
    code, output = finish(process)
    assert code == 0, output
    assert "exited with code -9" in output
    assert results(out) == reference


def test_a_classify_worker_killed_mid_run_is_replaced_and_the_predictions_are_the_same(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    """predict on a running broker: two workers embed, one classifies until it is killed, a new one takes over."""
    out = tmp_path / "out"
    tiny = ["--models", "tiny", "--broker-timeout", "5"]
    with LocalCluster(tmp_path / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(tmp_path / "log.jsonl"), "--heartbeat-interval", "0.2",
                             "--worker-timeout", "1.5", env=env)
        for name in ("embed-1", "embed-2"):
            cluster.start_worker(name, "--stage", "dnabert", "--stage", "esm", *tiny, env=env)
        doomed = cluster.start_worker("classify-1", "--stage", "classify", *tiny, env=env)
        process = start_predict(env, reads, "-o", out, "--broker", cluster.address, *COMMON)
        predictions = out / "work" / "classify"
        wait_for(lambda: list(predictions.glob("output_*_predictions.tsv")) or process.poll() is not None, 120,
                 "the first per-pair predictions")
        doomed.process.kill()
        before = len(list(predictions.glob("output_*_predictions.tsv")))
        cluster.start_worker("classify-2", "--stage", "classify", *tiny, env=env)
        code, output = finish(process)
        replacement = cluster.workers["classify-2"].log.read_text()
    assert code == 0, output
    assert before < len(list(predictions.glob("output_*_predictions.tsv")))
    assert "_predictions.tsv" in replacement  # the new worker classified what the killed one left
    assert results(out) == reference


def test_resume_after_killed_predict_recomputes_nothing_and_failed_files_give_exit_2(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    args = [reads, "-o", out, "--workers", "2", *COMMON]
    process = start_predict(env, *args)
    wait_for(lambda: embedded(out) or process.poll() is not None, 90, "the first DNABERT-S output")
    started = children(process.pid)
    process.kill()
    finish(process)
    # The broker and workers die with it: nothing is left running.
    wait_for(lambda: not any(alive(pid) for pid in started), 20, f"the children {started} to exit")
    assert len(started) == 3
    assert not any((out / name).exists() for name in RESULTS)
    assert embedded(out) and len(embedded(out)) < len(list((out / "work" / "nucleotide").glob("*.fa")))

    # A protein file the ESM-2 backend rejects fails on every worker; the rest goes on: exit 2.
    broken = out / "work" / "protein" / "output_2.fa"
    original = broken.read_text()
    broken.write_text(original.replace(">", ">\n>", 1))
    done = snapshot(out)
    run = predict(env, *args, "--resume")
    assert run.returncode == 2, run.stderr
    assert "already embedded; skipped" in run.stderr
    assert {f: v for f, v in snapshot(out).items() if f in done} == done
    failed = (out / "failed_files.txt").read_text().splitlines()
    assert len(failed) == 2 and failed[1].startswith(f"esm\t{broken.resolve()}\t") and "empty header" in failed[1]
    broken_ids = {line[1:] for line in original.splitlines() if line.startswith(">")}
    kept = [line for line in reference[RESULTS[0]].decode().splitlines(keepends=True)
            if line.split("\t")[0] not in broken_ids]
    assert (out / RESULTS[0]).read_text() == "".join(kept)

    broken.write_text(original)
    done = snapshot(out)
    run = predict(env, *args, "--resume")
    assert run.returncode == 0, run.stderr
    assert "file pairs already classified by this classifier; reused" in run.stderr
    assert {f: v for f, v in snapshot(out).items() if f in done} == done
    assert not (out / "failed_files.txt").exists()
    assert results(out) == reference


def test_resume_after_killed_broker_gives_the_same_predictions(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    out = tmp_path / "out"
    args = [reads, "-o", out, "--workers", "2", "--weighted", *COMMON]
    process = start_predict(env, *args)
    wait_for(lambda: embedded(out) or process.poll() is not None, 90, "the first DNABERT-S output")
    broker = [pid for pid, cmdline in children(process.pid).items() if "virnucpro-broker" in cmdline]
    assert len(broker) == 1
    os.kill(broker[0], signal.SIGKILL)
    code, output = finish(process)
    assert code == 1, output
    assert "broker exited with code -9" in output and "--resume" in output
    assert not any((out / name).exists() for name in RESULTS)
    run = predict(env, *args, "--resume")
    assert run.returncode == 0, run.stderr
    assert results(out) == reference


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: d / "absent.fa", [], "absent.fa: file not found"),
        (lambda d: _write(d / "notes.txt", "just some notes\n"), [], "not a FASTA or FASTQ file"),
        (lambda d: _write(d / "empty.fa", ""), [], "holds no FASTA records"),
        (lambda d: _write(d / "n.fa", ">r1\nNNNNNNNNNNNN\n>r2\nNNNNN\n"), [], "no open reading frame"),
        (lambda d: _write(d / "ok.fa", ">r1\nATGAAACCC\n"), ["--expected-length", "400"], "must be 300 or 500"),
        (lambda d: _write(d / "ok.fa", ">r1\nATGAAACCC\n"), ["--model-path", "BAD"],
         "not a VirNucPro classifier checkpoint"),
        (lambda d: _write(d / "mates.fa", ">m1 1:N\nATGAAACCC\n>m1 2:N\nATGCCCAAA\n"), [],
         "1 id is shared by several reads (m1)"),
        # The id ends at a tab as at a space: these four reads are all "sampleA".
        (lambda d: _write(d / "tabs.fa", "".join(f">sampleA\tread{i}\nATGAAACCC\n" for i in range(4))), [],
         "1 id is shared by several reads (sampleA)"),
        (lambda d: _write(d / "proteins.fa", ">p1\nMKVLIFEPQWLLKEF\n>p2\nMEEPQSDPSVEPPL\n"), [], "looks like protein"),
        (lambda d: _write(d / "blank.fa", ">r1\n>r2\n\n"), [], "all 2 records are empty"),
        (lambda d: _write(d / "ok.fa", ">r1\nATGAAACCC\n"), ["--broker", "tcp://127.0.0.1:9", "--precision", "fp32"],
         "--precision configure the broker and workers this command starts"),
    ],
    ids=["missing", "not-fasta", "empty", "no-orf", "expected-length", "bad-checkpoint", "duplicate-ids",
         "tab-in-header", "protein", "empty-records", "precision-with-broker"],
)
def test_bad_input_gives_one_message_exit_1_and_no_outputs(
        env: dict[str, str], tmp_path: Path, make_input: Callable[[Path], Path], extra: list[str],
        message: str) -> None:
    checkpoint = _write(tmp_path / "bad_model.pth", "not a checkpoint\n")
    extra = [str(checkpoint) if arg == "BAD" else arg for arg in extra]
    out = tmp_path / "out"
    run = predict(env, make_input(tmp_path), "-o", out, "--models", "tiny", "--workers", "2", *extra)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("error:") == 1 and message in " ".join(run.stderr.split())
    assert not out.exists()
    assert "broker:" not in run.stderr  # no process was started


def test_fastq_gzipped_with_an_empty_record_gives_the_predictions_of_the_fasta(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    with gzip.open(tmp_path / "reads.fq.gz", "wt") as fastq:
        for header, sequence in read_fasta(reads):
            fastq.write(f"@{header}\n{sequence}\n+\n{'I' * len(sequence)}\n")
        fastq.write("@nothing here\n\n+\n\n")
    out = tmp_path / "out"
    run = predict(env, tmp_path / "reads.fq.gz", "-o", out, "--workers", "2", *COMMON)
    assert run.returncode == 0, run.stderr
    assert "1 empty records skipped" in run.stderr
    assert results(out) == reference


def test_tabs_in_headers_and_sequence_lines_and_renamed_duplicates_keep_every_read(
        env: dict[str, str], reads: Path, tmp_path: Path, reference: dict[str, bytes]) -> None:
    records = list(read_fasta(reads))
    first_id = records[0][0].split()[0]
    with open(tmp_path / "reads.fa", "w") as fasta:
        for header, sequence in [*records, records[0]]:
            # A tab before the description, and tabs and spaces inside the sequence lines, as some tools write.
            lines = [sequence[i:i + 50] for i in range(0, len(sequence), 50)]
            fasta.write(f">{header.replace(' ', chr(9), 1)}\n" + "\n".join(f"{line[:20]}\t{line[20:30]} {line[30:]}"
                                                                         for line in lines) + "\n")
    out = tmp_path / "out"
    run = predict(env, tmp_path / "reads.fa", "-o", out, "--workers", "2", "--rename-duplicates", *COMMON)
    assert run.returncode == 0, run.stderr
    assert "1 reads had an id already used" in " ".join(run.stderr.split())
    ids = [row.split("\t")[0] for row in (out / RESULTS[0]).read_text().splitlines()[1:]]
    reference_ids = [row.split("\t")[0] for row in reference[RESULTS[0]].decode().splitlines()[1:]]
    copy_ids = [i.replace(first_id, f"{first_id}.2", 1) for i in reference_ids if i.startswith(f"{first_id}_chunk_")]
    assert copy_ids and ids == reference_ids + copy_ids


def test_output_dir_holding_a_run_is_refused_without_resume(env: dict[str, str], reads: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True)
    (out / "prediction_results.txt").write_text("earlier\n")
    run = predict(env, reads, "-o", out, "--models", "tiny", "--workers", "2")
    assert run.returncode == 1
    assert "already holds a virnucpro run; pass --resume" in " ".join(run.stderr.split())
    assert (out / "prediction_results.txt").read_text() == "earlier\n"
    assert list((out / "work").iterdir()) == []


def test_example_reads_are_the_same_for_the_same_seed(tmp_path: Path) -> None:
    for name in ("a.fa", "b.fa"):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_example_reads.py"), str(tmp_path / name),
                        "--reads", "50", "--seed", "7"], check=True, capture_output=True, timeout=60)
    text = (tmp_path / "a.fa").read_text()
    assert text == (tmp_path / "b.fa").read_text()
    assert text.count(">viral_") and text.count(">host_") and text.count(">") == 50
