"""`aspkd audit` end to end on a tiny digits scenario: trials behind each defence buy within
their budgets and are sold the defended answers, and the report, JSON, plot and MLflow run
hold the stealability curve, the calls to each level, the utility cost and PRADA. (Resuming
is the quality benchmark's: its rows and cells, tested in test_quality.)"""

import json

import pytest

from aspkd_ray.config import ConfigError, load


@pytest.fixture(scope="module")
def tiny(tiny_digits):
    root, sets = tiny_digits  # its cache is shared with the quality benchmark's test
    return root, [*sets, "audit.calls_per_class=[1, 3]", "audit.attacks=[vanilla]",
                  "audit.max_epochs=2", "audit.step_size=1",
                  "audit.defences=[{name: top1}, {name: gaussian_noise, scale: 0.3}]",
                  "audit.prada_min_distances=10", "audit.seeds=[0]"]


def test_audit_end_to_end(ray_session, tiny):
    from aspkd_ray.audit.runner import run_audit

    root, sets = tiny
    out = root / "audit"
    summary = run_audit("digits", sets, str(out))
    rows = json.loads((out / "trials.json").read_text())["rows"]
    assert len(rows) == 3 * 2 + 1  # (none, top1, noise) x budgets 1 and 3, and no calls
    for r in rows:
        if r["method"] == "prompt_only":
            assert r["calls_used"] == 0 and r["scenario"].endswith("/none")
            continue
        assert r["calls_used"] == r["budget"] == 10 * r["calls_per_class"]
        assert len(r["queries"]) == r["calls_used"] == len(set(r["queries"]))
        assert r["output"] == ("hard" if "/top1" in r["scenario"] else "soft")
    saved = json.loads((out / "audit.json").read_text())
    assert saved["zero_calls"] is not None
    assert saved["curves"] == summary["curves"] and len(saved["curves"]) == 3
    curve = {c["defence"]: c for c in saved["curves"]}
    noise = "gaussian_noise(scale=0.3, seed=0)"
    assert set(curve) == {"none", "top1", noise}
    for c in curve.values():
        assert [p["calls"] for p in c["points"]] == [10, 30]
        assert set(c["calls_to"]) == {"50.0", "80.0", "90.0"}
    utility = {u["defence"]: u for u in saved["utility"]}
    assert utility["top1"]["cost"] == 0 == utility["none"]["cost"]  # argmax kept
    assert utility[noise]["accuracy"] == utility["none"]["accuracy"]
    assert len(saved["prada"]) == 6 and saved["benign"]["calls"] > 100
    assert all(p["calls"] in (10, 30) for p in saved["prada"])
    md = (out / "audit.md").read_text()
    for part in ("## Stealability", "## Calls needed", "## What each defence costs",
                 "## PRADA", "| top1 | random picks"):
        assert part in md, part
    assert (out / "audit.png").stat().st_size > 10_000
    import mlflow

    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["stage"] == "audit"
    assert "agreement.top1.vanilla" in run.data.metrics



def test_audit_settings_are_checked_before_any_work():
    from aspkd_ray.audit.runner import check_audit

    for bad, key in ((["audit.defences=[{name: blur}]"], "audit.defences\\[0\\]"),
                     (["audit.attacks=[knockoff]"], "audit.attacks\\[0\\]"),
                     (["audit.calls_per_class=[]"], "audit.calls_per_class"),
                     (["audit.levels=[150]"], "audit.levels")):
        with pytest.raises(ConfigError, match=key):
            check_audit(load("digits", bad))
