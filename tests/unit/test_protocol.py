"""Wire protocol: well-formed messages round-trip, everything else is a ProtocolError."""

import msgpack
import pytest

from broker import protocol
from broker.protocol import VERSION, ErrorCode, ProtocolError, decode, encode, file_chunks
from broker.server import check_classifier, check_paths

SPEC = {"path": "/data/a.fa", "output": "/out/a.json", "sequences": 3, "residues": 300}
PAIR = {"path": "/w/dnabert/output_1_DNABERT_S.pt", "paired": "/w/esm/output_1_ESM.pt",
        "output": "/w/classify/output_1_predictions.tsv", "sequences": 7, "residues": 7}
CLASSIFIER = {"path": "/models/500_model.pth", "sha256": "ab" * 32}

GOOD = [
    ("register", dict(name="w", host="h", gpu="NVIDIA H100 PCIe", device="cuda:0", stages=["esm"], pid=1)),
    ("request", {}),
    ("heartbeat", dict(task=None)),
    ("heartbeat", dict(task="j:1", gauges={"gpu_util": 97.0})),
    ("done", dict(task="j:1", seconds=1.5, sequences=3, residues=300, skipped=False)),
    ("failed", dict(task="j:1", reason="CUDA error")),
    ("submit", dict(stage="synthetic", output_dir="/out", files=[SPEC], weighted=True, steal=False)),
    ("submit", dict(stage="synthetic", output_dir="/out", files=[SPEC], weighted=True, steal=True, backup=False)),
    ("submit", dict(stage="classify", output_dir="/w/classify", files=[], weighted=True, steal=True, open=True,
                    classifier=CLASSIFIER)),
    ("add", dict(job="j", first=0, files=[PAIR])),
    ("seal", dict(job="j", files=1)),
    ("added", dict(job="j", files=1)),
    ("job", dict(job="j")),
    ("status", {}),
    ("assign", dict(task="j:1", job="j", stage="esm", path="/data/a.fa", output_dir="/out", output="/out/a_ESM.pt")),
    ("keys", {}),
    ("worker_keys", dict(keys=[])),
    ("worker_keys", dict(keys=["rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"])),
    ("assign", dict(task="j:0", job="j", stage="classify", path=PAIR["path"], paired=PAIR["paired"],
                    output_dir="/w/classify", output=PAIR["output"], classifier=CLASSIFIER)),
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
        (msgpack.packb({"v": VERSION + 1, "type": "status"}), "unknown protocol version"),
        (msgpack.packb({"v": VERSION, "type": "launch"}), "unknown message type"),
        (msgpack.packb({"v": VERSION, "type": "failed", "task": "t"}), "missing field 'reason'"),
        (msgpack.packb({"v": VERSION, "type": "status", "extra": 1}), "unexpected fields"),
        (msgpack.packb({"v": VERSION, "type": "done", "task": "t", "seconds": -1.0, "sequences": 1, "residues": 1,
                        "skipped": False}), "bad value for field 'seconds'"),
        (msgpack.packb({"v": VERSION, "type": "done", "task": "t", "seconds": float("nan"), "sequences": 1,
                        "residues": 1, "skipped": False}), "bad value for field 'seconds'"),
        (msgpack.packb({"v": VERSION, "type": "register", "name": "w", "host": "h", "gpu": "g", "device": "cpu",
                        "stages": ["training"], "pid": 1}), "bad value for field 'stages'"),
        (msgpack.packb({"v": VERSION, "type": "submit", "stage": "esm", "output_dir": "/o", "weighted": True,
                        "steal": True, "files": [{**SPEC, "residues": True}]}), "bad value for field 'files'"),
        (msgpack.packb({"v": VERSION, "type": "submit", "stage": "esm", "output_dir": "/o", "weighted": True,
                        "steal": True, "backup": "no", "files": [SPEC]}), "bad value for field 'backup'"),
        (msgpack.packb({"v": VERSION, "type": "job", "job": "x" * 5000}), "bad value for field 'job'"),
        (msgpack.packb({"v": VERSION, "type": "add", "job": "j", "first": 0, "files": []}), "list of 1 to"),
        (msgpack.packb({"v": VERSION, "type": "add", "job": "j", "first": -1, "files": [SPEC]}), "field 'first'"),
        (msgpack.packb({"v": VERSION, "type": "add", "job": "j", "first": 0, "files": [{**SPEC, "inputs": []}]}),
         "must have exactly the keys path, output, sequences, residues \\(and perhaps paired, fingerprint\\)"),
        (msgpack.packb({"v": VERSION, "type": "seal", "job": "j"}), "missing field 'files'"),
        (msgpack.packb({"v": VERSION, "type": "submit", "stage": "classify", "output_dir": "/o", "weighted": True,
                        "steal": True, "files": [], "classifier": {"path": "/m.pth", "sha256": "AB" * 32}}),
         "SHA-256 digest: 64 lower-case hexadecimal digits"),
        (msgpack.packb({"v": VERSION, "type": "error", "reason": "unknown job 'j'"}), "missing field 'code'"),
        (msgpack.packb({"v": VERSION, "type": "error", "code": "unknown job", "reason": "r"}), "bad value for field 'code'"),
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


def test_a_classify_job_names_its_classifier_by_an_absolute_path_and_no_other_job_names_one():
    assert check_classifier("classify", CLASSIFIER) is None
    assert "must name its classifier checkpoint" in check_classifier("classify", None)
    assert "not an absolute path" in check_classifier("classify", {**CLASSIFIER, "path": "500_model.pth"})
    assert "takes no classifier" in check_classifier("esm", CLASSIFIER)
    assert check_classifier("esm", None) is None


def test_the_second_input_of_a_pair_must_be_an_absolute_path_too():
    assert check_paths("/w/classify", [PAIR]) is None
    assert "'esm/output_1_ESM.pt' is not an absolute path" in check_paths("/w/classify",
                                                                           [{**PAIR, "paired": "esm/output_1_ESM.pt"}])


def test_file_chunks_keep_order_and_stay_within_their_byte_and_count_budgets():
    files = [{**SPEC, "path": f"/data/{'d' * (i % 300)}/{i}.fa"} for i in range(5000)]
    chunks = list(file_chunks(files, most_bytes=64 * 1024, most_files=700))
    assert [f for chunk in chunks for f in chunk] == files
    assert all(len(chunk) <= 700 for chunk in chunks)
    assert all(sum(len(msgpack.packb(f)) for f in chunk) <= 64 * 1024 for chunk in chunks)
    assert len(chunks) > len(files) // 700  # the byte budget cut some chunks short


def test_a_chunk_of_the_longest_paths_allowed_is_a_message_far_under_the_frame_limit():
    longest = {**SPEC, "path": "/" + "p" * 4095, "output": "/" + "o" * 4095}
    chunks = list(file_chunks([longest] * 5000))
    frames = [encode("add", job="j", first=0, files=chunk) for chunk in chunks]
    assert len(chunks) > 1 and max(map(len, frames)) < protocol.MAX_MESSAGE_BYTES // 3
    assert all(decode(frame)["files"] for frame in frames)


def test_no_files_make_no_chunk():
    assert list(file_chunks([])) == []
