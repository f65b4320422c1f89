"""The headline command on a Flowers102 folder in torchvision's layout, with the bundled backbone, as a user runs it:

    AUTOPEFT_DATA=... autopeft search --budget 0.5% --dataset flowers102 --trials 3 --epochs 1 \
        --backbone autopeft_tiny_vit
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_fixtures import write_flowers


@pytest.mark.slow
def test_headline_search_on_flowers102_layout(tmp_path) -> None:
    labels = [1 + i % 102 for i in range(204)]  # 2 images of each of the 102 classes
    ids = list(range(1, 205))
    write_flowers(tmp_path / "data", trn=ids[0::3], val=ids[1::3], tst=ids[2::3], labels=labels)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "AUTOPEFT_DATA": str(tmp_path / "data"),
           "AUTOPEFT_CACHE": str(tmp_path / "cache")}
    # flowers102 brings its recipe (ViT-B/16 IN-21k, 4 at once): the bundled backbone and 2 at once keep it on CPUs
    cmd = [sys.executable, "-m", "autopeft", "search", "--budget", "0.5%", "--dataset", "flowers102",
           "--trials", "3", "--epochs", "1", "--grace-epochs", "1", "--backbone", "autopeft_tiny_vit",
           "--concurrency", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto configs under 0.5%" in proc.stdout and "studies/flowers102.db" in proc.stdout
    # 68 train images and the bundled backbone: the trials' batch is fitted and drop-path is off, and it says so
    assert "trials train with batch 11 instead of" in proc.stderr, proc.stderr[-3000:]
    assert "trials train with drop-path 0 instead of 0.1: autopeft_tiny_vit was pretrained with 0" in proc.stderr
    out = subprocess.run([sys.executable, "-m", "autopeft", "results", "--study", "flowers102", "--format", "json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    rows = json.loads(out.stdout)
    assert len(rows) == 3 and all(r["status"] in ("COMPLETE", "PRUNED") for r in rows), rows
