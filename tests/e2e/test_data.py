"""--data on launch: the archive is staged once per machine and shown to every rank."""

from __future__ import annotations

import pytest
from helpers import run_tlaunch

pytestmark = pytest.mark.timeout(200)

READER = r"""
import os, hashlib, sys
root = os.environ["TLAUNCH_DATA_DIR"]
digest = hashlib.sha256(open(os.path.join(root, "shard", "a.bin"), "rb").read()).hexdigest()
sys.stdout.write(f"RESULT rank={os.environ.get('RANK', '0')} dir={root} digest={digest}\n")  # one write per line
"""


def test_data_archive_is_staged_and_exposed_to_every_rank(tmp_path, gcs_bucket):
    import hashlib
    import os

    from tlaunch.storage import data_main

    src = tmp_path / "dataset" / "shard"
    src.mkdir(parents=True)
    payload = os.urandom(300_000)
    (src / "a.bin").write_bytes(payload)
    url = f"{gcs_bucket}/data/ds"
    assert data_main(["pack", str(tmp_path / "dataset"), url]) == 0
    script = tmp_path / "reader.py"
    script.write_text(READER)
    cache = tmp_path / "cache"
    out = run_tlaunch(
        str(script), "--cpus", "2", "--data", url, cwd=tmp_path, TLAUNCH_CACHE_DIR=str(cache)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 2
    dirs = {r[2] for r in rows}
    assert len(dirs) == 1 and str(cache) in dirs.pop()
    assert all(r[3] == f"digest={hashlib.sha256(payload).hexdigest()}" for r in rows)

    missing = run_tlaunch(
        str(script),
        "--data",
        f"{gcs_bucket}/nothing-here",
        cwd=tmp_path,
        TLAUNCH_CACHE_DIR=str(cache),
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and missing.stderr.strip().splitlines()[-1].startswith(
        "tlaunch: error:"
    )
