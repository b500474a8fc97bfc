"""Committed benchmark results are what the model card and README cite: each must parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*.json*"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_result_file_parses(path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        assert all(json.loads(line) for line in text.splitlines() if line.strip())
    else:
        assert json.loads(text)
