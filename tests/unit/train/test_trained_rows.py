"""The audit of what the model saw (``run.trained_rows_log``): the last worker group's lines for
each step, the rows skipped as bad apart from those trained on, and a line a killed worker left
cut short."""

import json

import pytest

from vcl_dist.train.trained_rows import TrainedRowsLog, trained_rows


def test_a_restarted_groups_steps_supersede_and_a_cut_short_line_is_no_step(tmp_path):
    first = TrainedRowsLog(str(tmp_path), 0)
    first.group = 1.0
    first.write(0, 1, 1, ["a", "b"])
    first.write(0, 2, 1, ["c", "d"], skipped=["shard#7"])  # trained by the first group, then lost with it
    with first.path.open("a") as file:  # the first group's worker killed while writing step 3
        file.write(json.dumps({"group": 1.0, "epoch": 0, "step": 3, "rank": 0, "keys": ["e"]})[:25])
    again = TrainedRowsLog(str(tmp_path), 0)
    again.path = tmp_path / "rank00000-pid2.jsonl"
    again.group = 2.0
    again.write(0, 2, 1, ["c"], skipped=["shard#7", "shard#8"])
    again.write(0, 3, 1, ["e", "f"])
    assert trained_rows(tmp_path) == {0: ["a", "b", "c", "e", "f"]}
    assert trained_rows(tmp_path, "skipped") == {0: ["shard#7", "shard#8"]}

    # A damaged line that is not the last one is not a killed write: it is reported.
    text = first.path.read_text()
    first.path.write_text("{not json\n" + text)
    with pytest.raises(ValueError, match="line 1 is not a trained-rows record"):
        trained_rows(tmp_path)
