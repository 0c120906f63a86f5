"""The file channel's core: chunking, the credit window, checksums, resuming, and what the file server refuses.

Both ends run as the pure state machines they are, wired together by a
small in-memory network and fake clock; every message crosses it encoded
and validated as on the wire.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol
from broker.events import (
    Assign,
    FileSpec,
    JobSubmitted,
    TaskSucceeded,
    WorkerJoined,
    WorkRequested,
    task_id,
    task_index,
)
from broker.protocol import ProtocolError
from broker.scheduler import Scheduler
from virnucpro.transfer import wire
from virnucpro.transfer.core import (
    GIVE_UP,
    STALL,
    Corrupt,
    DescribeInput,
    DiscardUpload,
    Download,
    Failed,
    Fetched,
    FileServerCore,
    PublishUpload,
    Received,
    Receiver,
    Reconnect,
    Reply,
    Send,
    SendChunk,
    SendInput,
    ServedFile,
    Stored,
    Truncate,
    Upload,
    Want,
    Write,
    WriteUpload,
)
from virnucpro.transfer.fileserver import TransferSetupError, bind_address, reachable_host
from virnucpro.transfer.remote import sees_client_files
from virnucpro.worker.session import Connected, MessageReceived, StartTask, WorkerSession

CHUNK, CREDIT = 10, 3
TOKEN = "t" * 43
WORKER = b"worker-1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def on_the_wire(kind: str, fields: dict[str, Any], data: bytes | None, schemas: dict) -> tuple[dict, bytes | None]:
    message, received = wire.decode(wire.encode(kind, data, **fields), schemas)
    return message, None if received is None else bytes(received)


# ------------------------------------------------------------------ receiver


def test_a_file_is_asked_for_in_chunks_of_the_chunk_size_the_last_one_short():
    receiver = Receiver(25, sha(b"x" * 25), now=0.0, chunk=CHUNK, credit=CREDIT)
    assert receiver.resume(0.0) == [Want(0, 10), Want(10, 10), Want(20, 5)]


def test_the_receiver_never_has_more_than_credit_chunks_asked_for_and_asks_one_more_per_chunk_taken():
    content = bytes(range(95))
    receiver = Receiver(len(content), sha(content), now=0.0, chunk=CHUNK, credit=CREDIT)
    asked = receiver.resume(0.0)
    assert asked == [Want(0, 10), Want(10, 10), Want(20, 10)] and receiver.asked == CREDIT
    out = receiver.accept(0, content[0:10], 1.0)
    assert out == [Write(0, content[0:10]), Want(30, 10)] and receiver.asked == CREDIT


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=300), chunk=st.integers(1, 40), credit=st.integers(1, 6))
def test_chunks_taken_in_order_rebuild_the_file_with_the_window_bounded(content, chunk, credit):
    receiver = Receiver(len(content), sha(content), now=0.0, chunk=chunk, credit=credit)
    rebuilt = bytearray(len(content))
    pending = receiver.resume(0.0)
    ended = []
    while pending:
        assert receiver.asked <= credit
        step, pending = pending[0], pending[1:]
        if isinstance(step, Want):
            pending += receiver.accept(step.offset, content[step.offset : step.offset + step.size], 1.0)
        elif isinstance(step, Write):
            rebuilt[step.offset : step.offset + len(step.data)] = step.data
        else:
            ended.append(step)
    assert ended == [Received()] and bytes(rebuilt) == content


def test_a_chunk_out_of_order_of_the_wrong_length_or_not_asked_for_is_ignored():
    content = bytes(range(40))
    receiver = Receiver(40, sha(content), now=0.0, chunk=CHUNK, credit=CREDIT)
    receiver.resume(0.0)
    assert receiver.accept(10, content[10:20], 1.0) == []  # the one expected first is at 0
    assert receiver.accept(0, content[0:9], 1.0) == []
    assert receiver.accept(30, content[30:40], 1.0) == []
    assert receiver.received == 0
    assert receiver.accept(0, content[0:10], 1.0)[0] == Write(0, content[0:10])


def test_bytes_that_do_not_have_the_announced_checksum_end_corrupt():
    receiver = Receiver(10, sha(b"0123456789"), now=0.0, chunk=CHUNK, credit=CREDIT)
    receiver.resume(0.0)
    assert receiver.accept(0, b"0123456780", 1.0) == [Write(0, b"0123456780"), Corrupt(sha(b"0123456780"))]


def test_an_empty_file_is_received_at_once():
    assert Receiver(0, sha(b""), now=0.0).resume(0.0) == [Received()]


def test_a_receiver_resumes_from_the_offset_it_holds():
    content = bytes(range(60))
    receiver = Receiver(60, sha(content), now=0.0, chunk=CHUNK, credit=CREDIT)
    receiver.resume(0.0)
    receiver.accept(0, content[0:10], 1.0)
    receiver.accept(10, content[10:20], 1.0)
    assert receiver.resume(9.0) == [Want(20, 10), Want(30, 10), Want(40, 10)]


# ---------------------------------------------- both ends, over a fake network


class Network:
    """The client's file server (core plus in-memory disk) and the messages between it and workers."""

    def __init__(self, inputs: dict[str, bytes], outputs: list[str] | None = None) -> None:
        self.disk = dict(inputs)  # the client's files, path -> content
        self.core = FileServerCore("/out/.uploads", chunk=CHUNK, credit=CREDIT)
        outputs = outputs or [f"/out/{i}.json" for i in range(len(inputs))]
        self.files = [ServedFile(path, output) for path, output in zip(inputs, outputs, strict=True)]
        self.core.add_job(TOKEN, self.files)
        self.uploads: dict[str, bytearray] = {}
        self.now = 0.0
        self.lose: Callable[[str, dict], bool] = lambda direction, message: False
        self.requests: list[dict] = []

    def request(self, peer: bytes, kind: str, fields: dict, data: bytes | None = None) -> list[tuple[dict, bytes | None]]:
        """A worker's request, and the replies it gets back (unless lost)."""
        message, data = on_the_wire(kind, fields, data, wire.REQUESTS)
        if self.lose("request", message):
            return []
        self.requests.append(message)
        replies = self.perform(self.core.handle(peer, message, data, self.now))
        return [(m, d) for p, m, d in replies if p == peer and not self.lose("reply", m)]

    def perform(self, instructions: list) -> list[tuple[bytes, dict, bytes | None]]:
        replies = []
        for instruction in instructions:
            if isinstance(instruction, Reply):
                replies.append((instruction.peer, *on_the_wire(instruction.kind, instruction.fields, None,
                                                               wire.REPLIES)))
            elif isinstance(instruction, DescribeInput):
                content = self.disk[instruction.input]
                replies.append((instruction.peer, *on_the_wire(
                    "input", {"task": instruction.task, "size": len(content), "sha256": sha(content),
                              "complete": instruction.output in self.disk}, None, wire.REPLIES)))
            elif isinstance(instruction, SendInput):
                data = self.disk[instruction.input][instruction.offset : instruction.offset + instruction.size]
                replies.append((instruction.peer, *on_the_wire("chunk", {"task": instruction.task,
                                                                         "offset": instruction.offset}, data,
                                                               wire.REPLIES)))
            elif isinstance(instruction, WriteUpload):
                upload = self.uploads.setdefault(instruction.path, bytearray())
                upload[instruction.offset : instruction.offset + len(instruction.data)] = instruction.data
            elif isinstance(instruction, PublishUpload):
                first = instruction.output not in self.disk
                content = bytes(self.uploads.pop(instruction.path, b""))
                if first:
                    self.disk[instruction.output] = content
                replies += self.perform(self.core.published(instruction.path, first, self.now))
            elif isinstance(instruction, DiscardUpload):
                self.uploads.pop(instruction.path, None)
        return replies


def run(machine: Download | Upload, network: Network, local: bytearray, peer: bytes = WORKER,
        steps: int = 10_000) -> Fetched | Stored | Failed | None:
    """Drive a worker's transfer over the network, the clock moving one second per idle turn: how it ended,
    or None if it had not ended after `steps` instructions."""
    pending = list(machine.start(network.now))
    for _ in range(steps):
        if not pending:
            network.now += 1.0
            pending = machine.tick(network.now)
            continue
        instruction, pending = pending[0], pending[1:]
        if isinstance(instruction, (Fetched, Stored, Failed)):
            return instruction
        if isinstance(instruction, Send):
            replies = network.request(peer, instruction.kind, instruction.fields)
        elif isinstance(instruction, SendChunk):
            data = bytes(local[instruction.offset : instruction.offset + instruction.size])
            replies = network.request(peer, "chunk", instruction.fields, data)
        elif isinstance(instruction, Write):
            local[instruction.offset : instruction.offset + len(instruction.data)] = instruction.data
            replies = []
        elif isinstance(instruction, Truncate):
            local.clear()
            replies = []
        else:
            assert isinstance(instruction, Reconnect)
            replies = []
        for message, data in replies:
            pending += machine.handle(message, data, network.now)
    return None


CONTENT = bytes(range(256)) * 3  # 768 bytes: 77 chunks of 10


def test_a_download_fetches_the_input_byte_for_byte():
    network = Network({"/data/a.fa": CONTENT})
    local = bytearray()
    assert run(Download(TOKEN, "job:0", "0.json", chunk=CHUNK, credit=CREDIT), network, local) == Fetched(False)
    assert bytes(local) == CONTENT
    gets = [m for m in network.requests if m["type"] == "get"]
    assert len(gets) == 77 and all(m["size"] == CHUNK for m in gets[:-1]) and gets[-1]["size"] == 8


def test_a_download_whose_output_is_already_complete_on_the_client_fetches_nothing():
    network = Network({"/data/a.fa": CONTENT, "/out/0.json": b"{}"})
    local = bytearray()
    assert run(Download(TOKEN, "job:0", "0.json"), network, local) == Fetched(True)
    assert local == bytearray() and [m["type"] for m in network.requests] == ["stat"]


def test_a_download_resumes_from_the_offset_it_holds_after_the_connection_drops():
    network = Network({"/data/a.fa": CONTENT})
    dropped = []

    def lose(direction: str, message: dict) -> bool:
        # The connection drops once the worker holds 300 bytes: everything in flight then is lost.
        if direction == "reply" and message["type"] == "chunk" and 300 <= message["offset"] < 330 and not dropped:
            dropped.append(message["offset"])
        return bool(dropped) and network.now < 3.0

    network.lose = lose
    download = Download(TOKEN, "job:0", "0.json", chunk=CHUNK, credit=CREDIT, stall=STALL)
    local = bytearray()
    assert run(download, network, local) == Fetched(False)
    assert bytes(local) == CONTENT and download.resumes >= 1
    offsets = [m["offset"] for m in network.requests if m["type"] == "get"]
    resumed = len(offsets) - 1 - offsets[::-1].index(300)
    assert offsets[resumed:resumed + 3] == [300, 310, 320]  # asked again from where it stood, not from 0
    assert offsets.count(0) == 1
    assert sorted(set(offsets)) == list(range(0, 768, 10))


def test_a_download_with_the_wrong_checksum_starts_over_then_fails():
    network = Network({"/data/a.fa": CONTENT})
    real = network.perform

    def corrupting(instructions: list) -> list:
        replies = real(instructions)
        return [(p, m, bytes(10) if m["type"] == "chunk" and m["offset"] == 100 else d) for p, m, d in replies]

    network.perform = corrupting  # type: ignore[method-assign]
    download = Download(TOKEN, "job:0", "0.json", chunk=CHUNK, credit=CREDIT)
    outcome = run(download, network, bytearray())
    assert isinstance(outcome, Failed) and "wrong checksum" in outcome.reason
    assert [m["type"] for m in network.requests].count("stat") == 2  # one more attempt, from the start


def test_a_download_with_the_wrong_checksum_once_succeeds_on_its_second_attempt():
    network = Network({"/data/a.fa": CONTENT})
    real = network.perform
    corrupted = []

    def corrupt_once(instructions: list) -> list:
        replies = real(instructions)
        out = []
        for p, m, d in replies:
            if m["type"] == "chunk" and m["offset"] == 100 and not corrupted:
                corrupted.append(True)
                d = bytes(10)
            out.append((p, m, d))
        return out

    network.perform = corrupt_once  # type: ignore[method-assign]
    local = bytearray()
    assert run(Download(TOKEN, "job:0", "0.json", chunk=CHUNK, credit=CREDIT), network, local) == Fetched(False)
    assert bytes(local) == CONTENT


def test_a_download_fails_when_the_file_server_stays_silent():
    network = Network({"/data/a.fa": CONTENT})
    network.lose = lambda direction, message: True
    outcome = run(Download(TOKEN, "job:0", "0.json"), network, bytearray())
    assert isinstance(outcome, Failed) and f"for {GIVE_UP:g} s" in outcome.reason
    assert network.now >= GIVE_UP


def test_an_upload_is_verified_and_published_under_the_output_name_of_the_task():
    network = Network({"/data/a.fa": b">r\nACGT\n"}, outputs=["/out/a_synthetic.json"])
    upload = Upload(TOKEN, "job:0", "a_synthetic.json", len(CONTENT), sha(CONTENT))
    assert run(upload, network, bytearray(CONTENT)) == Stored(published=True)
    assert network.disk["/out/a_synthetic.json"] == CONTENT and network.uploads == {}


def test_an_upload_whose_sender_dies_is_resumed_by_the_next_sender_from_the_offset_the_server_holds():
    network = Network({"/data/a.fa": b">r\nACGT\n"})
    killed = Upload(TOKEN, "job:0", "0.json", len(CONTENT), sha(CONTENT))
    # The first worker sends 40 chunks and dies.
    network.lose = lambda direction, message: direction == "request" and message["type"] == "chunk" and \
        message["offset"] >= 400
    assert run(killed, network, bytearray(CONTENT), peer=b"worker-1", steps=200) is None
    network.lose = lambda direction, message: False
    held = network.core._uploads  # what the server holds for the file
    assert [u.receiver.received for u in held.values()] == [400]
    network.requests.clear()
    again = Upload(TOKEN, "job:0", "0.json", len(CONTENT), sha(CONTENT))
    assert run(again, network, bytearray(CONTENT), peer=b"worker-2") == Stored(published=True)
    chunks = [m["offset"] for m in network.requests if m["type"] == "chunk"]
    assert chunks[0] == 400 and network.disk["/out/0.json"] == CONTENT


def test_an_upload_resends_its_offer_after_silence_and_the_server_answers_with_what_it_lacks():
    network = Network({"/data/a.fa": b">r\nACGT\n"})
    lost = []

    def lose(direction: str, message: dict) -> bool:
        if direction == "reply" and message["type"] == "want" and message["offset"] == 500 and not lost:
            lost.append(True)
            return True
        return False

    network.lose = lose
    upload = Upload(TOKEN, "job:0", "0.json", len(CONTENT), sha(CONTENT), stall=STALL)
    assert run(upload, network, bytearray(CONTENT)) == Stored(published=True)
    assert upload.resumes == 1 and [m["type"] for m in network.requests].count("put") == 2
    assert network.disk["/out/0.json"] == CONTENT


def test_an_upload_with_the_wrong_checksum_is_discarded_offered_again_then_refused():
    network = Network({"/data/a.fa": b">r\nACGT\n"})
    upload = Upload(TOKEN, "job:0", "0.json", len(CONTENT), sha(b"something else"))
    outcome = run(upload, network, bytearray(CONTENT))
    assert isinstance(outcome, Failed) and "(mismatch)" in outcome.reason
    assert "/out/0.json" not in network.disk and network.uploads == {}
    assert [m["type"] for m in network.requests].count("put") == 2


def test_a_second_copy_of_an_output_is_stored_but_not_published():
    network = Network({"/data/a.fa": b">r\nACGT\n"})
    assert run(Upload(TOKEN, "job:0", "0.json", 4, sha(b"firs")), network, bytearray(b"firs")) == Stored(True)
    assert run(Upload(TOKEN, "job:0", "0.json", 4, sha(b"late")), network, bytearray(b"late")) == Stored(False)
    assert network.disk["/out/0.json"] == b"firs"


# ------------------------------------------------------- what is refused


def refusal(replies: list[tuple[dict, bytes | None]]) -> str:
    [(message, _)] = replies
    assert message["type"] == "refused"
    return message["code"]


@pytest.mark.parametrize("token", ["", "t" * 42, "t" * 44, "T" * 43, "é" * 43])
def test_a_request_without_the_jobs_token_is_refused_and_reads_nothing(token):
    network = Network({"/data/a.fa": CONTENT})
    for kind, fields in [("stat", {"output": "0.json"}), ("get", {"offset": 0, "size": 10}),
                         ("put", {"output": "0.json", "size": 3, "sha256": sha(b"abc")})]:
        if not token:
            with pytest.raises(ProtocolError):
                wire.decode(wire.encode(kind, token=token, task="job:0", **fields), wire.REQUESTS)
            continue
        instructions = network.core.handle(WORKER, {"type": kind, "token": token, "task": "job:0", **fields}, None, 0.0)
        assert [type(i) for i in instructions] == [Reply] and instructions[0].fields["code"] == "token"
    assert network.uploads == {}


@pytest.mark.parametrize("task,output", [
    ("job:1", "1.json"),  # an index past the job's files
    ("job", "0.json"),  # not a task id
    ("job:-1", "0.json"),
    ("job:0", "passwd"),  # the job's file, but another output name
    ("job:0", "../0.json"),
])
def test_a_request_for_something_that_is_not_the_jobs_is_refused(task, output):
    network = Network({"/data/a.fa": CONTENT})
    assert refusal(network.request(WORKER, "stat", {"token": TOKEN, "task": task, "output": output})) == "unknown"
    assert refusal(network.request(WORKER, "put", {"token": TOKEN, "task": task, "output": output, "size": 1,
                                                   "sha256": sha(b"x")})) == "unknown"
    assert network.core.receiving == 0


def test_a_token_opens_only_its_own_jobs_files():
    core = FileServerCore("/up")
    core.add_job("a" * 43, [ServedFile("/data/a.fa", "/out/a.json")])
    core.add_job("b" * 43, [ServedFile("/data/b0.fa", "/out/b0.json"), ServedFile("/data/b1.fa", "/out/b1.json")])
    [reply] = core.handle(WORKER, {"type": "get", "token": "a" * 43, "task": "job:1", "offset": 0, "size": 10}, None, 0)
    assert isinstance(reply, Reply) and reply.fields["code"] == "unknown"
    [send] = core.handle(WORKER, {"type": "get", "token": "b" * 43, "task": "job:1", "offset": 0, "size": 10}, None, 0)
    assert send == SendInput(WORKER, "job:1", "/data/b1.fa", 0, 10)


def test_a_task_with_further_inputs_serves_each_by_its_number_and_no_other():
    core = FileServerCore("/up")
    served = ServedFile("/w/dnabert/output_1_DNABERT_S.pt", "/w/classify/output_1_predictions.tsv",
                        ("/w/esm/output_1_ESM.pt", "/models/500_model.pth"))
    core.add_job(TOKEN, [served])
    stat = {"type": "stat", "token": TOKEN, "task": "job:0", "output": "output_1_predictions.tsv"}
    assert core.handle(WORKER, stat, None, 0) == [DescribeInput(WORKER, "job:0", served.input, served.output)]
    assert core.handle(WORKER, {**stat, "input": 2}, None, 0) == [
        DescribeInput(WORKER, "job:0", "/models/500_model.pth", served.output)]
    get = {"type": "get", "token": TOKEN, "task": "job:0", "offset": 10, "size": 10, "input": 1}
    assert core.handle(WORKER, get, None, 0) == [SendInput(WORKER, "job:0", "/w/esm/output_1_ESM.pt", 10, 10)]
    [reply] = core.handle(WORKER, {**get, "input": 3}, None, 0)
    assert isinstance(reply, Reply) and reply.fields["code"] == "unknown" and "no input 3" in reply.fields["reason"]


def test_a_download_of_a_further_input_names_it_in_every_request_and_fetches_it_whole():
    network = Network({"/data/a.fa": b"the file itself"})
    network.core.add_job(TOKEN, [ServedFile("/data/a.fa", "/out/0.json", ("/data/b.pt",))])
    network.disk["/data/b.pt"] = CONTENT
    local = bytearray()
    assert run(Download(TOKEN, "job:0", "0.json", chunk=CHUNK, credit=CREDIT, input=1), network, local) == \
        Fetched(False)
    assert bytes(local) == CONTENT
    assert {m.get("input") for m in network.requests} == {1}


def test_files_added_to_a_job_are_served_after_those_offered_by_their_index_in_the_job():
    core = FileServerCore("/up")
    core.add_job(TOKEN, [ServedFile("/data/0.fa", "/out/0.json")])
    core.add_files(TOKEN, [ServedFile("/data/1.fa", "/out/1.json")])
    get = {"type": "get", "token": TOKEN, "task": "job:1", "offset": 0, "size": 10}
    assert core.handle(WORKER, get, None, 0) == [SendInput(WORKER, "job:1", "/data/1.fa", 0, 10)]


def test_chunks_from_a_peer_that_was_not_asked_are_ignored():
    network = Network({"/data/a.fa": CONTENT})
    network.request(b"worker-1", "put", {"token": TOKEN, "task": "job:0", "output": "0.json", "size": 30,
                                         "sha256": sha(bytes(30))})
    assert network.request(b"intruder", "chunk", {"token": TOKEN, "task": "job:0", "offset": 0}, bytes(10)) == []
    assert network.uploads == {}


def test_idle_and_unfinished_uploads_are_discarded_with_their_partial_files():
    core = FileServerCore("/up", chunk=CHUNK, credit=CREDIT, idle=100.0)
    core.add_job(TOKEN, [ServedFile("/data/a.fa", "/out/a.json")])
    core.handle(WORKER, {"type": "put", "token": TOKEN, "task": "j:0", "output": "a.json", "size": 30,
                         "sha256": sha(bytes(30))}, None, 0.0)
    written = core.handle(WORKER, {"type": "chunk", "token": TOKEN, "task": "j:0", "offset": 0}, bytes(10), 1.0)
    [write] = [w for w in written if isinstance(w, WriteUpload)]
    assert core.tick(50.0) == []
    assert core.tick(101.0) == [DiscardUpload(write.path)] and core.receiving == 0
    core.handle(WORKER, {"type": "put", "token": TOKEN, "task": "j:0", "output": "a.json", "size": 30,
                         "sha256": sha(bytes(30))}, None, 200.0)
    assert [type(i) for i in core.close()] == [DiscardUpload]


def test_too_many_uploads_at_once_are_refused_as_busy():
    core = FileServerCore("/up", max_uploads=2)
    core.add_job(TOKEN, [ServedFile(f"/data/{i}.fa", f"/out/{i}.json") for i in range(3)])
    for index in range(3):
        out = core.handle(WORKER, {"type": "put", "token": TOKEN, "task": f"j:{index}", "output": f"{index}.json",
                                   "size": 5, "sha256": sha(b"12345")}, None, 0.0)
    assert isinstance(out[0], Reply) and out[0].fields["code"] == "busy"


def test_upload_paths_lie_in_the_upload_directory_and_keep_the_outputs_name():
    core = FileServerCore("/out/.virnucpro-uploads-x", chunk=CHUNK)
    core.add_job(TOKEN, [ServedFile("/data/a.fa", "/out/a_ESM.pt")])
    core.handle(WORKER, {"type": "put", "token": TOKEN, "task": "j:0", "output": "a_ESM.pt", "size": 4,
                         "sha256": sha(b"abcd")}, None, 0.0)
    out = core.handle(WORKER, {"type": "chunk", "token": TOKEN, "task": "j:0", "offset": 0}, b"abcd", 0.0)
    [write] = [i for i in out if isinstance(i, WriteUpload)]
    [publish] = [i for i in out if isinstance(i, PublishUpload)]
    assert os.path.dirname(write.path) == "/out/.virnucpro-uploads-x" and write.path.endswith("-a_ESM.pt")
    assert publish == PublishUpload(write.path, "/out/a_ESM.pt")


# ---------------------------------------------------------------- the wire


def test_chunks_carry_exactly_one_data_frame_and_other_messages_none():
    assert wire.decode(wire.encode("chunk", b"abc", task="j:0", offset=0), wire.REPLIES)[1] == b"abc"
    with pytest.raises(ProtocolError, match="no data frame"):
        wire.decode(wire.encode("chunk", task="j:0", offset=0), wire.REPLIES)
    with pytest.raises(ProtocolError, match="unexpected data frame"):
        wire.decode(wire.encode("want", b"abc", task="j:0", offset=0, size=3), wire.REPLIES)
    with pytest.raises(ProtocolError, match="unknown message type 'stat'"):
        wire.decode(wire.encode("stat", token=TOKEN, task="j:0", output="x"), wire.REPLIES)


@pytest.mark.parametrize("fields,reason", [
    ({"offset": 0, "size": 0}, "field 'size'"),
    ({"offset": 0, "size": wire.MAX_CHUNK + 1}, "field 'size'"),
    ({"offset": -1, "size": 10}, "field 'offset'"),
])
def test_a_get_for_an_impossible_range_is_malformed(fields, reason):
    with pytest.raises(ProtocolError, match=reason):
        wire.decode(wire.encode("get", token=TOKEN, task="j:0", **fields), wire.REQUESTS)


def test_an_offer_without_a_real_sha256_is_malformed():
    with pytest.raises(ProtocolError, match="SHA-256"):
        wire.decode(wire.encode("put", token=TOKEN, task="j:0", output="x", size=1, sha256="ABC"), wire.REQUESTS)


# ------------------------------------------------- broker messages and task ids


TRANSFER = {"address": "tcp://10.0.0.5:40000", "token": TOKEN, "server_key": None, "marker": "/out/.m",
            "marker_sha256": sha(b"m")}


def test_submit_and_assign_carry_the_transfer_map_and_reject_a_malformed_one():
    spec = {"path": "/data/a.fa", "output": "/out/a.json", "sequences": 1, "residues": 4}
    for kind, fields in [("submit", dict(stage="synthetic", output_dir="/out", files=[spec], weighted=False,
                                         steal=False)),
                         ("assign", dict(task="j:0", job="j", stage="esm", path="/a.fa", output_dir="/out",
                                         output="/out/a_ESM.pt"))]:
        assert protocol.decode(protocol.encode(kind, **fields, transfer=TRANSFER))["transfer"] == TRANSFER
        assert "transfer" not in protocol.decode(protocol.encode(kind, **fields))
        with pytest.raises(ProtocolError, match="field 'transfer'"):
            protocol.decode(protocol.encode(kind, **fields, transfer={**TRANSFER, "path": "/etc"}))


def test_task_ids_name_the_files_index_in_its_submission_as_the_scheduler_assigns_them():
    assert task_index(task_id("20240101-000000-abc123", 17)) == 17
    assert [task_index(t) for t in ("j", "j:", "j:x", "j:-1", "j:٣", "j:" + "9" * 12)] == [None] * 6
    scheduler = Scheduler()
    scheduler.handle(WorkerJoined("w", "w", "h", "g", 1.0, ("synthetic",), 0.0))
    specs = tuple(FileSpec(f"/data/{i}.fa", f"/out/{i}.json", 1, 10 * (i + 1)) for i in range(5))
    out = scheduler.handle(JobSubmitted("job", "synthetic", "/out", specs, False, False, 0.0))
    out += scheduler.handle(WorkRequested("w", 0.5))
    assigned = []
    for now in range(1, 10):
        for assign in [i for i in out if isinstance(i, Assign)]:
            assigned.append(assign)
            out = scheduler.handle(TaskSucceeded("w", assign.task, 1.0, False, float(now)))
            out += scheduler.handle(WorkRequested("w", float(now)))
    assert len(assigned) == len(specs)
    for assign in assigned:
        index = task_index(assign.task)
        assert index is not None and specs[index].path == assign.path and specs[index].output == assign.output


# ----------------------------------------------------------- worker's choice


def test_a_worker_sees_the_clients_files_only_if_it_reads_the_marker_with_the_announced_content(tmp_path: Path):
    marker = tmp_path / ".virnucpro-marker-x"
    marker.write_bytes(b"m")
    assert sees_client_files(TRANSFER | {"marker": str(marker)})
    assert not sees_client_files(TRANSFER | {"marker": str(marker), "marker_sha256": sha(b"n")})
    assert not sees_client_files(TRANSFER | {"marker": str(tmp_path / "absent")})
    assert not sees_client_files(TRANSFER | {"marker": None, "marker_sha256": None})  # --transfer always


def test_the_file_server_listens_where_workers_reach_the_broker_or_where_it_is_told():
    assert reachable_host("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert reachable_host("ipc:///run/virnucpro/broker") == "127.0.0.1"
    assert bind_address("tcp://127.0.0.1:5555", None) == "tcp://127.0.0.1:*"
    assert bind_address("tcp://127.0.0.1:5555", "10.0.0.5") == "tcp://10.0.0.5:*"
    assert bind_address("tcp://127.0.0.1:5555", "10.0.0.5:7000") == "tcp://10.0.0.5:7000"
    assert bind_address("tcp://127.0.0.1:5555", "tcp://10.0.0.5:7000") == "tcp://10.0.0.5:7000"
    assert bind_address("tcp://127.0.0.1:5555", "fd00::5") == "tcp://[fd00::5]:*"
    assert bind_address("tcp://127.0.0.1:5555", "[fd00::5]:7000") == "tcp://[fd00::5]:7000"
    with pytest.raises(TransferSetupError, match="must be a number"):
        bind_address("tcp://127.0.0.1:5555", "head:http")
    with pytest.raises(TransferSetupError, match="not a wildcard"):
        bind_address("tcp://127.0.0.1:5555", "0.0.0.0")


def test_the_worker_session_hands_the_transfer_map_of_an_assignment_to_the_task():
    session = WorkerSession({"name": "w", "host": "h", "gpu": "g", "device": "cpu", "stages": ["esm"], "pid": 1},
                            broker_timeout=10.0, address="tcp://head:5555")
    session.handle(Connected(0.0))
    session.handle(MessageReceived(protocol.decode(protocol.encode(
        "registered", worker="w", name="w", weight=1.0, heartbeat_interval=1.0)), 0.1))
    fields = dict(task="j:0", job="j", stage="esm", path="/data/a.fa", output_dir="/out", output="/out/a_ESM.pt")
    [start] = session.handle(MessageReceived(protocol.decode(protocol.encode("assign", **fields, transfer=TRANSFER)),
                                             0.2))
    assert start == StartTask({**fields, "transfer": TRANSFER})
