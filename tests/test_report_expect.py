"""The qualitative claims' `expect` conditions of pipeline/figures/reference.yaml."""
from __future__ import annotations

import pytest

from pipeline.figures.report import ReferenceError, _expect, evaluate, reference


@pytest.mark.parametrize("expr, values, holds", [
    ("rho > 1", {"rho": 1.2}, True),
    ("rho > 1", {"rho": 0.9}, False),
    ("ours <= upg", {"ours": 1.0, "upg": 2.0}, True),
    ("|rho_lambda - 1| <= 0.1", {"rho_lambda": 0.95}, True),
    ("|rho_lambda - 1| <= 0.1", {"rho_lambda": 1.08}, True),
    ("|rho_lambda - 1| <= 0.1", {"rho_lambda": 0.76}, False),
    ("|rho_lambda - 1| <= 0.1", {"rho_lambda": 1.2}, False),
    (["rho > 1", "|rho_lambda - 1| <= 0.1"], {"rho": 1.2, "rho_lambda": 0.76}, False),
    (["rho > 1", "|rho_lambda - 1| <= 0.1"], {"rho": 1.2, "rho_lambda": 1.02}, True),
    (["rho > 1", "|rho_lambda - 1| <= 0.1"], {"rho": 0.8, "rho_lambda": 1.02}, False),
])
def test_expect(expr, values, holds):
    assert _expect(expr, values) is holds


def test_a_malformed_condition_is_named():
    with pytest.raises(ReferenceError, match="rho >> 1"):
        _expect("rho >> 1", {"rho": 2.0})


def test_rho_lambda_near_one_checks_both_spectral_radii(tmp_path):
    """ρ > 1 alone no longer reads "reproduced": ρ_λ must be within 0.1 of 1 too."""
    entry = next(e for e in reference()["claims"] if e["id"] == "rho_lambda_near_one")
    metrics = tmp_path / "results/vision/imagenet_small_upg/metrics.json"
    metrics.parent.mkdir(parents=True)
    for rho_lambda, status in ((0.76, "not reproduced"), (1.03, "reproduced")):
        metrics.write_text(f'{{"scale": "paper", "dataset": "imagenet", "status": "finished", '
                           f'"spectral": {{"rho": 1.2, "rho_lambda": {rho_lambda}}}}}')
        assert evaluate(entry, tmp_path / "results", "paper")["status"] == status
