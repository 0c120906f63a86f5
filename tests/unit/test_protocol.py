"""Wire protocol: well-formed messages round-trip, everything else is a ProtocolError."""

import msgpack
import pytest

from broker import protocol
from broker.protocol import ErrorCode, ProtocolError, decode, encode
from broker.server import check_paths

SPEC = {"path": "/data/a.fa", "output": "/out/a.json", "sequences": 3, "residues": 300}

GOOD = [
    ("register", dict(name="w", host="h", gpu="NVIDIA H100 PCIe", device="cuda:0", stages=["esm"], pid=1)),
    ("request", {}),
    ("heartbeat", dict(task=None)),
    ("heartbeat", dict(task="j:1", gauges={"gpu_util": 97.0})),
    ("done", dict(task="j:1", seconds=1.5, sequences=3, residues=300, skipped=False)),
    ("failed", dict(task="j:1", reason="CUDA error")),
    ("submit", dict(stage="synthetic", output_dir="/out", files=[SPEC], weighted=True, steal=False)),
    ("submit", dict(stage="synthetic", output_dir="/out", files=[SPEC], weighted=True, steal=True, backup=False)),
    ("job", dict(job="j")),
    ("status", {}),
    ("assign", dict(task="j:1", job="j", stage="esm", path="/data/a.fa", output_dir="/out", output="/out/a_ESM.pt")),
    ("keys", {}),
    ("worker_keys", dict(keys=[])),
    ("worker_keys", dict(keys=["rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"])),
    ("registered", dict(worker="ab", name="w", weight=1.5, heartbeat_interval=1.0)),
    *[("error", dict(code=code.value, reason="why, in words")) for code in ErrorCode],
]


@pytest.mark.parametrize("kind,fields", GOOD)
def test_well_formed_messages_round_trip(kind, fields):
    message = decode(encode(kind, **fields))
    assert message == {"v": protocol.VERSION, "type": kind, **fields}


@pytest.mark.parametrize(
    "frame,reason",
    [
        (b"\xc1garbage", "undecodable"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"v": 2, "type": "status"}), "unknown protocol version"),
        (msgpack.packb({"v": 1, "type": "launch"}), "unknown message type"),
        (msgpack.packb({"v": 1, "type": "failed", "task": "t"}), "missing field 'reason'"),
        (msgpack.packb({"v": 1, "type": "status", "extra": 1}), "unexpected fields"),
        (msgpack.packb({"v": 1, "type": "done", "task": "t", "seconds": -1.0, "sequences": 1, "residues": 1,
                        "skipped": False}), "bad value for field 'seconds'"),
        (msgpack.packb({"v": 1, "type": "done", "task": "t", "seconds": float("nan"), "sequences": 1,
                        "residues": 1, "skipped": False}), "bad value for field 'seconds'"),
        (msgpack.packb({"v": 1, "type": "register", "name": "w", "host": "h", "gpu": "g", "device": "cpu",
                        "stages": ["training"], "pid": 1}), "bad value for field 'stages'"),
        (msgpack.packb({"v": 1, "type": "submit", "stage": "esm", "output_dir": "/o", "weighted": True,
                        "steal": True, "files": [{**SPEC, "residues": True}]}), "bad value for field 'files'"),
        (msgpack.packb({"v": 1, "type": "submit", "stage": "esm", "output_dir": "/o", "weighted": True,
                        "steal": True, "backup": "no", "files": [SPEC]}), "bad value for field 'backup'"),
        (msgpack.packb({"v": 1, "type": "job", "job": "x" * 5000}), "bad value for field 'job'"),
        (msgpack.packb({"v": 1, "type": "error", "reason": "unknown job 'j'"}), "missing field 'code'"),
        (msgpack.packb({"v": 1, "type": "error", "code": "unknown job", "reason": "r"}), "bad value for field 'code'"),
        (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), "oversized"),
    ],
)
def test_malformed_messages_are_rejected_with_the_reason(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)


def test_job_paths_must_be_absolute_and_outputs_directly_in_the_output_directory():
    assert check_paths("/out", [SPEC | {"output": "/out/a.json"}]) is None
    assert "not an absolute path" in check_paths("out", [SPEC])
    assert "not an absolute path" in check_paths("/out", [SPEC | {"path": "data/a.fa"}])
    for outside in ("/out/../etc/passwd", "/outside/a.json", "/out-2/a.json", "/out", "/out/", "/out/sub/a.json",
                    "/out/..", "/out/sub/../a.json"):
        assert "not a file name directly in the job's output directory" in check_paths(
            "/out", [SPEC | {"output": outside}]), outside


@pytest.mark.parametrize("output_dir,reason", [
    ("/", "the root of the file system"),
    ("out", "not an absolute path"),
    ("/data/../etc", "not in normal form"),
    ("/data/out/", "not in normal form"),
    ("//data", "not in normal form"),
    ("/data/o\x00ut", "control character '\\x00'"),
    ("/data/o\nut", "control character '\\n'"),
    ("/data/o\x1b[31mut", "control character '\\x1b'"),
])
def test_an_output_directory_no_worker_may_write_in_is_refused_with_the_reason(output_dir, reason):
    assert reason in check_paths(output_dir, [SPEC | {"output": output_dir.rstrip("/") + "/a.json"}])


def test_inputs_and_output_names_with_control_characters_are_refused():
    assert "control character" in check_paths("/out", [SPEC | {"path": "/data/a\n.fa"}])
    assert "not a file name" in check_paths("/out", [SPEC | {"output": "/out/a\r.json"}])
