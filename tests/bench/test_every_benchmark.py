"""Every benchmark and study runs end to end in its quick mode through `mixem-fast bench`, and writes its JSON."""

import json

import pytest
from typer.testing import CliRunner

from mixem.bench import available
from mixem.cli.app import app


@pytest.mark.parametrize("name", available())
def test_quick_run(name, tmp_path):
    r = CliRunner().invoke(app, ["bench", name, "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    written = sorted(tmp_path.glob("*.json"))
    assert len(written) == 1 and r.output.strip().splitlines()[-1] == f"wrote {written[0]}"
    data = json.loads(written[0].read_text())
    assert data["bench"] == name and data["quick"] is True and data["device"]["type"] == "cpu"
    if "cases" in data:  # a timed benchmark: every case checked first (where it has a check), every candidate ran
        assert data["cases"]
        for case in data["cases"]:
            assert case.get("check", {"status": "ok"})["status"] == "ok", case
            assert case["candidates"] and all(c["status"] == "ok" for c in case["candidates"].values()), case
            assert all(c["median_ms"] > 0 for c in case["candidates"].values())
    else:  # a study: its parameters are recorded and it printed what it found
        assert data["params"] and data["lines"] and all(line in r.output for line in data["lines"])
