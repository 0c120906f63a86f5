"""The synthetic device: residues / speed seconds per file, and a speed change at a given time after its first file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from virnucpro.backends.synthetic import SyntheticBackend
from virnucpro.cli import cli


def test_a_file_takes_its_residues_over_the_speed():
    device = SyntheticBackend(1000.0)
    assert device.seconds_for(5000, started=100.0) == 5.0
    assert device.seconds_for(5000, started=900.0) == 5.0


def test_a_speed_change_counts_from_the_first_file_and_a_file_running_across_it_does_the_rest_at_the_new_speed():
    device = SyntheticBackend(1000.0, change=(5.0, 250.0))
    assert device.seconds_for(2000, started=100.0) == 2.0  # the first file starts the clock: the change is at 105
    assert device.seconds_for(4000, started=102.0) == 3.0 + 1000 / 250  # 3 s at 1000/s, then 1000 residues at 250/s
    assert device.seconds_for(1000, started=110.0) == 4.0


@pytest.mark.parametrize("speed,change", [(0.0, None), (1000.0, (-1.0, 10.0)), (1000.0, (1.0, 0.0))])
def test_a_device_that_could_never_finish_is_refused(speed, change):
    with pytest.raises(ValueError, match="synthetic"):
        SyntheticBackend(speed, change)


@pytest.mark.parametrize("value", ["5", "x:100", "5:0", "-1:100"])
def test_the_worker_option_names_itself_and_the_form_it_takes(value):
    result = CliRunner().invoke(cli, ["worker", "--synthetic-speed", "1000", "--synthetic-speed-change", value])
    assert result.exit_code == 2
    assert "--synthetic-speed-change" in result.output and "write T:R" in result.output
