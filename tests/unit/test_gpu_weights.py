"""The GPU weight table, its override file, and weighted bin-packing."""

import logging
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virnucpro.pipeline import gpu_weights
from virnucpro.pipeline.gpu_weights import (
    GPU_WEIGHTS,
    WeightFileError,
    assign_files_weighted,
    get_gpu_weight,
    load_weight_table,
    lookup_weight,
)


@pytest.fixture(autouse=True)
def no_user_weight_file(monkeypatch):
    monkeypatch.delenv("VIRNUCPRO_GPU_WEIGHTS", raising=False)


EXPECTED = {
    "RTX 3080": 0.90,
    "RTX 3090": 1.00,
    "RTX 4080": 1.35,
    "RTX 4090": 1.50,
    "RTX A6000": 1.10,
    "A100": 1.20,
    "H100": 2.50,
    "V100 16GB": 0.75,
    "V100 32GB": 0.80,
}


@pytest.mark.parametrize("model,weight", sorted(EXPECTED.items()))
def test_table_holds_every_required_model(model, weight):
    assert GPU_WEIGHTS[model] == weight
    assert lookup_weight(model) == weight


@pytest.mark.parametrize(
    "device_name,weight",
    [
        ("NVIDIA GeForce RTX 3080", 0.90),
        ("NVIDIA GeForce RTX 3090", 1.00),
        ("NVIDIA GeForce RTX 4080", 1.35),
        ("NVIDIA GeForce RTX 4090", 1.50),
        ("NVIDIA RTX A6000", 1.10),
        ("NVIDIA A100-SXM4-80GB", 1.20),
        ("NVIDIA A100-PCIE-40GB", 1.20),
        ("NVIDIA A100 80GB PCIe", 1.20),
        ("NVIDIA H100 80GB HBM3", 2.50),
        ("NVIDIA H100 PCIe", 2.50),
        ("NVIDIA H100 NVL", 2.50),
        ("Tesla V100-SXM2-32GB", 0.80),
        ("Tesla V100-PCIE-32GB", 0.80),
        ("Tesla V100-PCIE-16GB", 0.75),
        ("Tesla V100-SXM2-16GB", 0.75),
        ("nvidia geforce rtx 4090", 1.50),
    ],
)
def test_names_reported_by_torch_find_their_model(device_name, weight):
    assert lookup_weight(device_name) == weight


def test_similar_but_different_models_are_not_confused():
    table = load_weight_table()
    assert table.match("NVIDIA RTX 6000 Ada Generation") is None
    assert table.match("NVIDIA GH200 480GB") is None
    assert table.match("NVIDIA GeForce RTX 3060") is None


def test_unknown_gpu_gets_weight_one_and_a_single_warning(caplog):
    table = load_weight_table()
    with caplog.at_level(logging.WARNING, logger=gpu_weights.__name__):
        assert table.lookup("NVIDIA L40S") == 1.0
        assert table.lookup("NVIDIA L40S") == 1.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "NVIDIA L40S" in warnings[0]
    assert "--gpu-weights" in warnings[0] and "[weights]" in warnings[0]


def test_get_gpu_weight_reads_the_name_torch_reports(monkeypatch):
    import torch

    names = {0: "NVIDIA GeForce RTX 4090", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[device])
    assert get_gpu_weight(0) == 1.50
    assert get_gpu_weight(1) == 2.50


def write(tmp_path, text, name="weights.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_weight_file_overrides_and_extends_the_built_in_table(tmp_path):
    path = write(
        tmp_path,
        """
        [weights]
        "RTX 4090" = 1.8
        "NVIDIA L40S" = 1.3
        "A100 80GB" = 1.4
        """,
    )
    table = load_weight_table(path)
    assert table.lookup("NVIDIA GeForce RTX 4090") == 1.8
    assert table.lookup("NVIDIA L40S") == 1.3
    assert table.lookup("NVIDIA A100-SXM4-80GB") == 1.4  # more specific than the built-in "A100"
    assert table.lookup("NVIDIA A100-PCIE-40GB") == 1.2
    assert table.lookup("NVIDIA GeForce RTX 3090") == 1.0
    assert table.sources["RTX 4090"] == str(path)
    assert table.sources["RTX 3090"] == "built-in"


def test_environment_variable_names_the_weight_file(tmp_path, monkeypatch):
    path = write(tmp_path, '[weights]\n"RTX 3090" = 1.1\n')
    monkeypatch.setenv("VIRNUCPRO_GPU_WEIGHTS", str(path))
    assert lookup_weight("NVIDIA GeForce RTX 3090") == 1.1


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightFileError, match=r"absent\.toml: weight file not found"):
        load_weight_table(tmp_path / "absent.toml")


def test_invalid_toml_is_a_clear_error(tmp_path):
    path = write(tmp_path, "[weights\nRTX = \n")
    with pytest.raises(WeightFileError, match=r"weights\.toml: not valid TOML"):
        load_weight_table(path)


def test_file_without_weights_table_is_a_clear_error(tmp_path):
    path = write(tmp_path, '[gpus]\n"RTX 3090" = 1.0\n')
    with pytest.raises(WeightFileError, match=r"weights\.toml: no \[weights\] table"):
        load_weight_table(path)


@pytest.mark.parametrize("value", ["0", "-1.5", '"fast"', "true", "nan"])
def test_non_positive_or_non_numeric_weight_names_file_and_key(tmp_path, value):
    path = write(tmp_path, f'[weights]\n"RTX 4090" = {value}\n')
    with pytest.raises(WeightFileError, match=r"weights\.toml: weights\.'RTX 4090'"):
        load_weight_table(path)


def costs_of(assignment, costs):
    return [sum(costs[f] for f in files) for files in assignment]


def test_weighted_packing_gives_a_faster_gpu_proportionally_more_residues():
    costs = {f"f{i}": 1000 for i in range(100)}
    assignment = assign_files_weighted(list(costs), 2, [1.0, 1.5], costs=list(costs.values()))
    slow, fast = costs_of(assignment, costs)
    assert abs(fast - 1.5 * slow) <= 1000 * 1.5


@pytest.mark.parametrize(
    "device_names",
    [
        ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"],
        ["NVIDIA GeForce RTX 3090", "NVIDIA H100 80GB HBM3"],
        ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090", "NVIDIA H100 PCIe"],
    ],
)
def test_weighted_packing_balances_finish_times_of_real_gpu_mixes(device_names):
    weights = [lookup_weight(n) for n in device_names]
    costs = [500 + (i * 37) % 400 for i in range(120)]
    assignment = assign_files_weighted(list(range(120)), len(weights), weights, costs=costs)
    finish = [sum(costs[i] for i in files) / w for files, w in zip(assignment, weights, strict=True)]
    assert max(finish) - min(finish) <= max(costs) / min(weights)
    assert sorted(i for files in assignment for i in files) == list(range(120))


def test_packing_puts_the_largest_file_first_on_the_fastest_finisher():
    assignment = assign_files_weighted(["small", "big", "mid"], 2, [1.0, 2.5], costs=[1, 100, 10])
    assert assignment == [["mid", "small"], ["big"]]


def test_single_worker_gets_every_file_largest_first():
    assignment = assign_files_weighted(["a", "b", "c"], 1, [0.75], costs=[5, 50, 20])
    assert assignment == [["b", "c", "a"]]


def test_packing_is_deterministic_for_equal_inputs():
    costs = [7, 7, 7, 3, 3, 9, 1, 7]
    files = [f"f{i}" for i in range(len(costs))]
    runs = [assign_files_weighted(files, 3, [1.0, 1.0, 1.5], costs=costs) for _ in range(5)]
    assert all(run == runs[0] for run in runs)


def test_packing_reads_costs_from_fasta_files_when_not_given(fasta_factory):
    big = fasta_factory("big.fa", [300] * 10)
    small = fasta_factory("small.fa", [300] * 2)
    tiny = fasta_factory("tiny.fa", [300])
    assert assign_files_weighted([tiny, small, big], 2, [1.0, 1.0]) == [[big], [small, tiny]]


def test_existing_loads_are_counted_before_packing():
    assert assign_files_weighted(["a"], 2, [1.0, 1.0], costs=[10], loads=[50, 0]) == [[], ["a"]]


def packing_by_scanning_every_worker(costs, weights, loads):
    """The definition: largest file first, to the worker that would finish it earliest, ties to the lowest index."""
    current = list(map(float, loads))
    assignment = [[] for _ in weights]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        best = min(range(len(weights)), key=lambda w: ((current[w] + costs[i]) / weights[w], w))
        assignment[best].append(i)
        current[best] += costs[i]
    return assignment


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=60), st.lists(
    st.tuples(st.sampled_from([0.75, 1.0, 1.2, 1.5, 2.5]), st.integers(0, 20_000)), min_size=1, max_size=12))
def test_packing_by_weight_heaps_places_every_file_where_scanning_every_worker_would(costs, workers):
    weights, loads = [w for w, _ in workers], [load for _, load in workers]
    assert assign_files_weighted(list(range(len(costs))), len(workers), weights, costs=costs, loads=loads) == (
        packing_by_scanning_every_worker(costs, weights, loads)
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_workers=0, gpu_weights=[]), "num_workers must be an integer >= 1"),
        (dict(num_workers=2, gpu_weights=[1.0]), "got 1 GPU weights for 2 workers"),
        (dict(num_workers=2, gpu_weights=[1.0, 0.0]), "weight of worker 1 is 0.0"),
        (dict(num_workers=1, gpu_weights=[-2.0]), "weight of worker 0 is -2.0"),
        (dict(num_workers=1, gpu_weights=[1.0], costs=[1]), "got 1 costs for 2 files"),
    ],
)
def test_bad_packing_arguments_raise_value_error(kwargs, message):
    kwargs.setdefault("costs", [1, 2])
    with pytest.raises(ValueError, match=message):
        assign_files_weighted(["a", "b"], **kwargs)
