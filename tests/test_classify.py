import numpy as np

from jaxcfl._core.classify import Rule, classify


def test_rule_on_synthetic_diagnostics():
    finite = np.array([True, True, True, True, False, True, True])
    rate = np.array([-1e-2, 1e-2, 0.0, 1e-3, np.nan, 1e-2, -1e-2])
    stderr = np.array([1e-5, 1e-5, 1e-5, 1e-2, np.nan, 1e-5, 1e-5])
    at_rounding = np.array([False, False, True, False, False, True, False])
    status = classify(finite, rate, stderr, at_rounding)
    # decaying | growing | at rounding level | insignificant slope | non-finite | growing but at rounding | decaying
    assert status.tolist() == ["stable", "divergent", "stable", "restrained", "divergent", "stable", "stable"]


def test_amplified_perturbation_makes_a_settled_run_restrained():
    finite = np.array([True, True])
    rate = np.array([-1e-2, -1e-2])
    stderr = np.array([1e-5, 1e-5])
    at_rounding = np.array([False, False])
    status = classify(finite, rate, stderr, at_rounding, divergence=np.array([1e-6, 0.3]), rule=Rule(divergence=1e-3))
    assert status.tolist() == ["stable", "restrained"]


def test_threshold_z_controls_significance():
    args = (np.array([True]), np.array([1e-3]), np.array([4e-4]), np.array([False]))
    assert classify(*args, rule=Rule(z=2.0))[0] == "divergent"
    assert classify(*args, rule=Rule(z=4.0))[0] == "restrained"
