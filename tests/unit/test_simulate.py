"""The scheduling simulator command: policies compared on a sample for a set of GPUs."""

from click.testing import CliRunner

from tools.simulate import compare, main


def test_weighted_seeding_beats_the_equal_split_on_mixed_gpus_and_stealing_fixes_wrong_weights():
    right = {row["policy"]: row for row in compare(["RTX 3090", "H100"], {}, files=120, seed=2)}
    assert right["equal split (the old static one)"]["ratio"] > 1.4
    assert right["--weighted"]["ratio"] < 1.05
    wrong = {row["policy"]: row for row in compare(["RTX 3090", "H100"], {"H100": 4.0}, files=120, seed=2)}
    assert wrong["--weighted"]["ratio"] > 1.2
    assert wrong["--weighted --steal"]["ratio"] < 1.05
    assert wrong["--weighted --steal"]["steals"] > 0


def test_simulate_command_prints_a_row_per_policy():
    result = CliRunner().invoke(main, ["--gpus", "RTX 3090,RTX 4090", "--files", "60"])
    assert result.exit_code == 0, result.output
    for policy in ("equal split", "--weighted", "--weighted --steal"):
        assert policy in result.stdout
