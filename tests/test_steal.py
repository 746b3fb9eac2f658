"""`aspkd steal` end to end on a small digits attack: budget, summary, MLflow, hard mode,
resume. The proxy generator is a plugin serving real digits (the real plugin code path), so
the test needs no trained diffusion model."""

import hashlib
import json
import sqlite3
import textwrap

import numpy as np
import pytest
import torch

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


def _round_checkpoints(out) -> dict[str, dict[str, tuple[int, str]]]:
    """Ray Train's round checkpoints of a run: folder name -> {file: (mtime_ns, sha256)}."""
    root = out / "ray_train" / "attack"
    found = {}
    for folder in sorted(root.glob("checkpoint_*")):
        if not folder.is_dir():  # checkpoint_manager_snapshot.json: Ray Train's index
            continue
        found[folder.name] = {str(f.relative_to(folder)): (
            f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(folder.rglob("*")) if f.is_file()}
    return found


def _states(out) -> dict[int, tuple]:
    """round number -> (attack state, student weights) of every round checkpoint."""
    from aspkd_ray.train.attack import load_round_checkpoint

    states = {}
    for folder in (out / "ray_train" / "attack").glob("checkpoint_*"):
        if not folder.is_dir():
            continue
        state, weights = load_round_checkpoint(folder)
        states[state.round] = (state, weights)
    return states


def _spent(out) -> int:
    from aspkd_ray.teacher import Ledger

    return Ledger(str(out / "ledger"), create=False).status()["spent"]


@pytest.fixture(scope="module")
def soft(ray_session, base):
    """The soft attack run once, then rerun on its finished folder."""
    from aspkd_ray.jobs.steal import run_steal

    root, sets = base
    out = root / "soft"
    cfg = from_dict({}, sets + [f"output_dir={out}", "ray.teacher_service=t-steal-soft"])
    summary = run_steal(cfg)
    first = _round_checkpoints(out), _spent(out)
    again = run_steal(cfg)
    return out, summary, first, again


@pytest.mark.timeout(600)
def test_steal_soft_end_to_end(soft):
    out, summary, (checkpoints, spent), _ = soft
    _summary_checks(summary, out, 20)
    assert spent == 20
    assert len(checkpoints) == 2  # one Ray Train checkpoint per round
    assert sorted(_states(out)) == [1, 2]


@pytest.mark.timeout(600)
def test_rerun_of_a_finished_attack_recomputes_no_round(soft):
    """Rerunning on the same folder resumes the finished attack: no round runs again (Ray
    Train gains no checkpoint, the round checkpoints' files are untouched), no new calls,
    and the summary's rounds are the stored ones."""
    out, summary, (checkpoints, spent), again = soft
    assert _round_checkpoints(out) == checkpoints  # same folders, same files, same mtimes
    assert _spent(out) == spent == 20 and again["calls_used"] == 20
    # per-round metrics as reported by the rounds of the first run (round_time_s and the
    # student's weights digest included), and the same evaluation of those students
    for key in ("rounds", "agreement_by_round", "pseudo_label_agreement_by_round"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(summary[key],
                                                                    sort_keys=True), key


@pytest.fixture(scope="module")
def interrupted(soft, base):
    """The soft attack, on the same proxy set, stopped after round 1 (a trial cap of 10
    calls refuses round 2's purchase: BudgetExhausted), then rerun without the cap."""
    from aspkd_ray.jobs.steal import run_steal
    from aspkd_ray.teacher import BudgetExhausted

    root, sets = base
    out = root / "interrupted"
    sets = sets + [f"output_dir={out}", f"proxy.dir={soft[0] / 'proxy'}",
                   "ray.teacher_service=t-steal-interrupted"]
    with pytest.raises(BudgetExhausted, match="trial cap exhausted"):
        run_steal(from_dict({}, sets + ["budget.per_trial=10"]), trial="capped")
    stopped = _round_checkpoints(out), _spent(out), _states(out)
    # the same service (it outlives the failed run) and ledger, without the cap
    resumed = run_steal(from_dict({}, sets))
    return out, stopped, resumed


@pytest.mark.timeout(900)
def test_resume_after_an_interruption_continues_from_the_round_checkpoint(soft, interrupted):
    full_out, full = soft[0], soft[1]
    out, (checkpoints, spent, states), summary = interrupted
    # it stopped after round 1, with round 1 bought and checkpointed
    assert spent == 10 and sorted(states) == [1] and len(checkpoints) == 1
    # the rerun ran round 2 only: round 1's checkpoint is untouched, one more was added,
    # and only round 2's 10 labels were bought
    after = _round_checkpoints(out)
    assert len(after) == 2 and {k: after[k] for k in checkpoints} == checkpoints
    assert _spent(out) == 20 and summary["calls_used"] == 20
    resumed, _ = _states(out)[2]
    round1, _ = states[1]
    np.testing.assert_array_equal(resumed.bought_idx[:10], round1.bought_idx)
    np.testing.assert_array_equal(resumed.bought_labels[:10], round1.bought_labels)
    assert resumed.history[0] == round1.history[0] and resumed.pseudo[0]["idx"].tolist() == \
        round1.pseudo[0]["idx"].tolist()
    # the same picks as the uninterrupted attack: round 1's, and round 2's (selected with
    # the checkpoint's student and the (seed, round) rng). This needs round 1 to train the
    # same student in both runs, as it does on CPUs:
    (_, got_weights), (_, full_weights) = states[1], _states(full_out)[1]
    assert all(torch.equal(got_weights[k], v) for k, v in full_weights.items()), \
        "round 1 trained another student than the uninterrupted run (not reproducible here?)"
    want, _ = _states(full_out)[2]
    np.testing.assert_array_equal(resumed.bought_idx, want.bought_idx)
    np.testing.assert_array_equal(resumed.bought_labels, want.bought_labels)
    assert summary["agreement_by_round"][0] == full["agreement_by_round"][0]


@pytest.mark.timeout(900)
def test_resumed_attack_ends_with_the_uninterrupted_student(soft, interrupted):
    full_out, full = soft[0], soft[1]
    out, _, summary = interrupted
    (resumed, weights), (want, want_weights) = _states(out)[2], _states(full_out)[2]
    np.testing.assert_array_equal(resumed.pseudo[1]["idx"], want.pseudo[1]["idx"])
    for name, tensor in want_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert summary["agreement_by_round"] == full["agreement_by_round"]


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
