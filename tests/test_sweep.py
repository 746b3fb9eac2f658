"""A tiny Ray Tune sweep: two trials share one proxy set and one teacher service, each within
its own budget, each its own attack."""

import json

import pytest
import yaml
from test_steal import PLUGIN


@pytest.mark.timeout(900)
def test_two_trial_sweep_shares_the_teacher_within_caps(ray_session, tmp_path):
    from aspkd_ray.sweep.tune import load_sweep, run_sweep
    from aspkd_ray.teacher import Ledger

    plugin = tmp_path / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "cache_dir": str(tmp_path / "cache"),
        "generator": {"kind": "plugin", "plugin": f"{plugin}:make", "batch_size": 50},
        "proxy": {"per_class": 12}, "budget": {"calls_per_class": 1},
        "victim": {"training": {"max_epochs": 1}},
        "training": {"max_epochs": 1, "patience": 1},
    }))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "sweep": {"space": {"aspkd.sigma": {"grid": [0.5, 2.0]}}, "max_concurrent_trials": 1},
    }))
    rows = run_sweep(load_sweep(tmp_path / "sweep.yaml"), tmp_path / "out")
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    assert sorted(r["aspkd.sigma"] for r in rows) == [0.5, 2.0]
    assert all(r["calls_used"] == 10 for r in rows)  # each trial: its own n = 10
    status = Ledger(str(tmp_path / "out" / "ledger"), create=False).status()
    assert 10 <= status["spent"] <= 20 and len(status["trial_spent"]) == 2
    saved = json.loads((tmp_path / "out" / "sweep_results.json").read_text())
    assert [r["agreement"] for r in saved] == sorted((r["agreement"] for r in saved),
                                                    reverse=True)
