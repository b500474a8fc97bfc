"""The pictures ``privface eval lfw --plot`` writes beside its JSON."""

from __future__ import annotations

from privface.model_commands import _plot_subsets


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subset_balance_plot_from_one_draw_or_several(tmp_path):
    results = {f"subset_{s}": {"accuracy": 0.94 + s / 1000} for s in range(6)}
    _plot_subsets(tmp_path / "one.png", results, {})
    draws = {n: {"accuracy": [r["accuracy"], r["accuracy"] - 0.002], "mean": r["accuracy"] - 0.001}
             for n, r in results.items()}
    _plot_subsets(tmp_path / "deep" / "three.png", results, {"subset_draws": draws})
    assert _png(tmp_path / "one.png") and _png(tmp_path / "deep" / "three.png")
