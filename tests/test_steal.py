"""`aspkd steal` end to end on a small digits attack: budget, summary, MLflow, hard mode,
resume. The proxy generator is a plugin serving real digits (the real plugin code path), so
the test needs no trained diffusion model."""

import json
import sqlite3
import textwrap

import numpy as np
import pytest

from aspkd_ray.config import from_dict

PLUGIN = textwrap.dedent('''
    import numpy as np
    from aspkd_ray.datasets import load_generator_data

    def make(config, class_names, device):
        data = load_generator_data("digits")
        def generate(prompts, class_ids, seeds):
            out = []
            for c, s in zip(class_ids, seeds):
                rng = np.random.default_rng(s)
                pool = np.flatnonzero(data.labels == c)
                img = data.images[rng.choice(pool)].astype(np.float32)
                img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255)
                out.append(img.astype(np.uint8))
            return out
        return generate
''')


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("steal")
    plugin = root / "digits_plugin.py"
    plugin.write_text(PLUGIN)
    return root, [
        f"cache_dir={root / 'cache'}", "generator.kind=plugin",
        f"generator.plugin={plugin}:make", "generator.batch_size=50",
        "proxy.per_class=20", "budget.calls_per_class=2",
        "victim.training.max_epochs=2", "training.max_epochs=1", "training.patience=1",
    ]


def _summary_checks(summary, out, budget):
    assert summary["calls_used"] == budget == summary["budget"]
    assert len(summary["agreement_by_round"]) == 2  # 2 calls per class → 2 rounds
    for key in ("agreement", "calls_per_class", "pseudo_label_filter_rate",
                "pseudo_label_agreement", "wall_time_s", "mlflow_run_id"):
        assert key in summary, key
    assert 0 <= summary["agreement"] <= 100
    assert (out / "agreement.png").stat().st_size > 1000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["agreement"] == summary["agreement"]
    with sqlite3.connect(out / "mlflow.db") as db:
        (n,) = db.execute("select count(*) from runs where run_uuid=?",
                          (summary["mlflow_run_id"],)).fetchone()
        metrics = {r[0] for r in db.execute("select key from metrics where run_uuid=?",
                                            (summary["mlflow_run_id"],))}
    assert n == 1 and {"agreement", "calls_used", "agreement_final"} <= metrics


@pytest.mark.timeout(600)
def test_steal_soft_end_to_end_and_resume(ray_session, base):
    from aspkd_ray.jobs.steal import run_steal
    from aspkd_ray.teacher import Ledger

    root, sets = base
    out = root / "soft"
    cfg = from_dict({}, sets + [f"output_dir={out}", "ray.teacher_service=t-steal-soft"])
    summary = run_steal(cfg)
    _summary_checks(summary, out, 20)
    ledger = Ledger(str(out / "ledger"), create=False)
    assert ledger.status()["spent"] == 20

    # Rerunning on the same folder resumes the finished attack: no new calls, same result.
    again = run_steal(cfg)
    assert Ledger(str(out / "ledger"), create=False).status()["spent"] == 20
    assert again["agreement"] == summary["agreement"]


@pytest.mark.timeout(600)
def test_steal_hard_label_victim(ray_session, base):
    from aspkd_ray.jobs.steal import run_steal

    root, sets = base
    out = root / "hard"
    # with the init step and prior correction (class-weighted loss) through Ray Train
    cfg = from_dict({}, sets + [f"output_dir={out}", "victim.output=hard",
                                "student.pretrain=proxy_prompts", "aspkd.prior_correction=true",
                                "ray.teacher_service=t-steal-hard"])
    summary = run_steal(cfg)
    _summary_checks(summary, out, 20)
    assert summary["victim_output"] == "hard"
    assert summary["student_pretrain"] == "proxy_prompts"
    assert summary["pretrain"]["epochs"] == 1


@pytest.mark.timeout(600)
def test_prompt_only_baseline_makes_no_calls(ray_session, base):
    from aspkd_ray.jobs.steal import run_steal

    root, sets = base
    out = root / "prompt"
    cfg = from_dict({}, sets + [f"output_dir={out}", "aspkd.baseline=prompt_only",
                                "ray.teacher_service=t-steal-prompt"])
    summary = run_steal(cfg)
    assert summary["calls_used"] == 0 and summary["method"] == "prompt_only"
    assert not (out / "ledger").exists()
    assert np.isfinite(summary["agreement"])


def test_each_run_logs_to_its_own_mlflow_database(tmp_path):
    import mlflow

    from aspkd_ray.tracking import mlflow_run, tracking_uri

    ids = []
    for name in ("a", "b"):
        cfg = from_dict({}, [f"output_dir={tmp_path / name}"])
        with mlflow_run(cfg, name) as run:
            mlflow.log_metric("x", 1.0)
            ids.append(run.info.run_id)
        assert tracking_uri(cfg).endswith(f"{name}/mlflow.db")
    for name, run_id in zip(("a", "b"), ids, strict=True):
        with sqlite3.connect(tmp_path / name / "mlflow.db") as db:
            rows = [r[0] for r in db.execute("select run_uuid from runs")]
        assert rows == [run_id]
