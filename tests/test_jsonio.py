"""mmfm.jsonio.write_json: the one writer of records, summaries and reports; atomic by rename."""
import json
import os
import subprocess
import sys

import pytest

from mmfm.jsonio import write_json, write_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_and_reads_back_and_leaves_no_temporary(tmp_path, capsys):
    path = tmp_path / "r.json"
    records = [{"bench": "x", "case": {"N": 3}, "impl": "mmfm", "ms": 1.5}]
    write_records(records, str(path))
    assert json.loads(path.read_text()) == records
    assert "wrote 1 records to" in capsys.readouterr().err
    write_records(records, None)              # no --json: nothing written, nothing said
    assert capsys.readouterr().err == ""
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)   # umask permissions, not mkstemp's


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"old": True})
    with pytest.raises(TypeError, match="summary.json: cannot write as JSON"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"old": True} and os.listdir(tmp_path) == ["summary.json"]


def test_a_killed_writer_never_leaves_a_truncated_file(tmp_path):
    """A child rewrites a large file in a loop and is killed at several moments once the loop
    runs: the target is always the whole old or the whole new document, never a prefix (a plain
    open(path, 'w') truncates first and is caught here)."""
    import time

    path = tmp_path / "big.json"
    write_json(path, {"n": -1, "pad": "x" * 2_000_000})
    child = ("import sys; from mmfm.jsonio import write_json\n"
             "i = 0\n"
             "while True:\n"
             "    write_json(sys.argv[1], {'n': i, 'pad': 'y' * 2_000_000}); i += 1\n"
             "    if i == 1: print('looping', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071, 0.1):
        p = subprocess.Popen([sys.executable, "-c", child, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "looping"
        time.sleep(delay)
        p.kill()
        p.wait()
        p.stdout.close()
        doc = json.loads(path.read_text())       # raises on a truncated file
        assert len(doc["pad"]) == 2_000_000 and doc["n"] >= 0
    for name in os.listdir(tmp_path):             # a killed writer may leave its own temporary, never a bad target
        assert name == "big.json" or name.startswith(".big.json.") and name.endswith(".tmp")
