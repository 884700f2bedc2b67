"""Two latency-table builds writing the same file at once: both finish, the table is whole and loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from latency_tables import LatencyTable
from search_spaces.space import load_space

from ..latency_table import MICRO_IMGSZ, micro_space_file


def test_two_concurrent_builds_of_one_table_do_not_corrupt_it(tmp_path):
    space_file = micro_space_file(tmp_path)
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "nas.cli", "latency", "build", "--space", str(space_file), "--backend", "ort-cpu",
           "--imgsz", str(MICRO_IMGSZ), "--out", str(out), "--threads", "1", "--quick", "--fit-models", "2",
           "--no-progress", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    expected = {s.key() for s in load_space(str(space_file)).block_signatures(MICRO_IMGSZ, 1)}
    doc = json.loads(out.read_text())  # whole JSON: atomic replace, never an interleaved write
    assert set(doc["entries"]) == expected
    table = LatencyTable.load(out)
    assert len(table) == len(expected) and all(m.median_ms > 0 for m in table.entries.values())
    assert table.predict(load_space(str(space_file)).largest()) > 0
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
