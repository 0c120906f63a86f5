"""Confined outputs: a worker derives every output path itself and never writes or reads through a link there."""

from __future__ import annotations

import json
import os
import re
import secrets
import uuid
from pathlib import Path

import pytest

from virnucpro.atomic import write_text_atomically
from virnucpro.client.run_dir import classify_spec
from virnucpro.pipeline.outputs import pair_predictions_path
from virnucpro.pipeline.sequences import FilePair
from virnucpro.scratch import LOCK_SUFFIX, WORK, Scratch
from virnucpro.stages import OutputRefused, is_complete, task_output
from virnucpro.worker.publish import publish

OUTPUT = json.dumps({"sequences": 1, "residues": 4, "records": []})


def test_the_output_is_derived_from_the_stage_the_input_and_the_directory() -> None:
    assert task_output("synthetic", "/data/in_3.fa", "/out") == Path("/out/in_3_synthetic.json")
    assert task_output("esm", "/data/in_3.faa.gz", "/out", "/out/in_3_ESM.pt") == Path("/out/in_3_ESM.pt")


def test_a_classify_task_writes_the_per_pair_file_the_client_names_for_its_pair(tmp_path: Path) -> None:
    pair = FilePair(index=3, nucleotide=tmp_path / "nucleotide" / "output_3.fa",
                    protein=tmp_path / "protein" / "output_3.fa", sequences=10)
    spec = classify_spec(pair, tmp_path)
    output = task_output("classify", spec["path"], str(tmp_path.resolve() / "classify"), spec["output"])
    assert output == pair_predictions_path(tmp_path.resolve() / "classify", 3)


def test_an_input_named_bashrc_cannot_make_the_worker_write_bashrc() -> None:
    assert task_output("synthetic", "/home/u/.bashrc", "/home/u") == Path("/home/u/.bashrc_synthetic.json")
    with pytest.raises(OutputRefused, match=r"the broker names the output '/home/u/.bashrc', but a synthetic task of "
                                            r"'/home/u/.bashrc' writes '/home/u/.bashrc_synthetic.json'"):
        task_output("synthetic", "/home/u/.bashrc", "/home/u", "/home/u/.bashrc")


@pytest.mark.parametrize("output_dir,reason", [
    ("/", "'/' is the root of the file system"),
    ("out", "is not an absolute path"),
    ("/data/../etc", "not in normal form"),
    ("/data\x00/out", "control character '\\x00'"),
    ("/data/out\n", "control character '\\n'"),
])
def test_a_worker_refuses_an_output_directory_with_the_reason(output_dir: str, reason: str) -> None:
    with pytest.raises(OutputRefused, match=re.escape(reason)):
        task_output("synthetic", "/data/in.fa", output_dir)


def test_an_input_name_with_a_control_character_is_refused() -> None:
    with pytest.raises(OutputRefused, match="holds the control character '\\\\x1b'; rename the input"):
        task_output("synthetic", "/data/\x1b[2Jin.fa", "/out")


def test_a_link_at_the_final_name_is_not_an_output_and_publishing_replaces_the_link_not_its_target(
        tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"kept": true}')
    final = tmp_path / "out" / "in_synthetic.json"
    final.parent.mkdir()
    final.symlink_to(target)
    assert is_complete(target) and not is_complete(final)
    written = tmp_path / "out" / "written.json"
    written.write_text(OUTPUT)
    assert publish(written, final) is True
    assert not final.is_symlink() and final.read_text() == OUTPUT
    assert target.read_text() == '{"kept": true}'


def test_a_dangling_link_at_the_final_name_is_replaced_without_creating_its_target(tmp_path: Path) -> None:
    final = tmp_path / "in_synthetic.json"
    final.symlink_to(tmp_path / "planted")
    written = tmp_path / "written.json"
    written.write_text(OUTPUT)
    assert publish(written, final) is True
    assert not (tmp_path / "planted").exists() and final.read_text() == OUTPUT


def test_a_link_planted_at_a_workers_scratch_name_is_not_followed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n: "planted")
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / f"{WORK}planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        Scratch(tmp_path, WORK)
    (tmp_path / f"{WORK}planted").unlink()
    (tmp_path / f"{WORK}planted{LOCK_SUFFIX}").symlink_to(victim / "lock")
    with pytest.raises(FileExistsError):
        Scratch(tmp_path, WORK)
    assert list(victim.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["victim", f"{WORK}planted{LOCK_SUFFIX}"])


def test_a_link_planted_at_a_temporary_name_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = uuid.UUID(int=7)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (tmp_path / f".report.json.{fixed.hex}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_text_atomically(tmp_path / "report.json", "{}")
    assert victim.read_text() == "untouched" and not (tmp_path / "report.json").exists()


def test_a_workers_scratch_is_private(tmp_path: Path) -> None:
    with Scratch(tmp_path, WORK) as scratch:
        assert os.stat(scratch.path).st_mode & 0o777 == 0o700
    assert list(tmp_path.iterdir()) == []
