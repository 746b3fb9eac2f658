"""The ASPKD round loop (Algorithm 1) with a fake teacher: budget, rounds, hard mode."""

import dataclasses

import numpy as np
import pytest
import torch

import aspkd_ray.aspkd.rounds as rounds_mod
from aspkd_ray.aspkd.rounds import ProxyPool, RoundSettings, run_rounds
from aspkd_ray.config import ASPKDConfig, TrainingConfig
from aspkd_ray.datasets import load_generator_data, to_tensor
from aspkd_ray.models import create_model


@pytest.fixture(scope="module")
def pool():
    data = load_generator_data("digits")  # real digits stand in for proxy images here
    x = to_tensor(data.images, 28, 1)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, va = idx[:240], idx[240:300]
    return ProxyPool(x=x[tr], classes=data.labels[tr], x_val=x[va],
                     classes_val=data.labels[va]), data.labels[tr]


ASPKD_KEYS = {f.name for f in dataclasses.fields(ASPKDConfig)}


def _settings(**kw):
    """RoundSettings with the aspkd keys (and the old names active / prompt_only) mapped
    into the aspkd section."""
    a = {"sigma": 1.0, "sigma_mode": "median"}
    if "active" in kw:
        a["selection"] = "paper" if kw.pop("active") else "random"
    if kw.pop("prompt_only", False):
        a["baseline"] = "prompt_only"
    a.update({k: kw.pop(k) for k in list(kw) if k in ASPKD_KEYS})
    base = dict(num_classes=10, budget=40, rounds=3, output="soft",
                training=TrainingConfig(max_epochs=1, patience=1, batch_size=64,
                                        augment=False),
                flip=False, seed=0, pretrain=False)
    base.update(kw)
    return RoundSettings(aspkd=ASPKDConfig(**a), **base)


class FakeTeacher:
    """Labels from the true classes; soft = a peaked distribution, hard = class ids."""

    def __init__(self, truth, output):
        self.truth, self.output, self.calls, self.asked = truth, output, 0, []

    def __call__(self, picks):
        self.calls += len(picks)
        self.asked.append(np.asarray(picks))
        if self.output == "hard":
            return self.truth[picks].astype(np.int64)
        probs = np.full((len(picks), 10), 0.02, dtype=np.float32)
        probs[np.arange(len(picks)), self.truth[picks]] = 0.82
        return probs


def _student():
    torch.manual_seed(0)
    return create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)


def test_budget_is_spent_exactly_over_rounds_without_repeats(pool):
    p, truth = pool
    teacher = FakeTeacher(truth, "soft")
    state = run_rounds(_student(), p, _settings(budget=41), teacher)
    assert teacher.calls == 41 and len(state.bought_idx) == 41
    assert [len(a) for a in teacher.asked] == [13, 13, 15]  # n/r, remainder in the last round
    assert len(np.unique(state.bought_idx)) == 41
    assert state.round == 3 and len(state.history) == 3


def test_every_round_recomputes_latents_and_pseudo_labels(pool, monkeypatch):
    p, truth = pool
    import aspkd_ray.aspkd.pseudo_labels as pl_mod

    seen = []
    real_rule = pl_mod.get_pseudo_label_rule("paper")

    def spy(inp):
        seen.append((inp.query.copy(), inp.reference.shape[0]))
        return real_rule(inp)

    monkeypatch.setitem(pl_mod.RULES.entries, "paper", spy)
    state = run_rounds(_student(), p, _settings(), FakeTeacher(truth, "soft"))
    assert [n for _, n in seen] == [13, 26, 40]  # the labelled set grows each round
    # the unlabelled pool's latents change between rounds (the student moved)
    first, second = seen[0][0][:50], seen[1][0][:50]
    assert not np.allclose(first, second)
    assert len(state.pseudo) == 3 and all(len(r["idx"]) > 0 for r in state.pseudo)


def test_hard_mode_never_sees_probabilities(pool, monkeypatch):
    p, truth = pool
    targets_seen = []
    real_fit = rounds_mod.fit

    def spy_fit(model, x, targets, cfg, **kw):
        targets_seen.append(targets.dtype)
        return real_fit(model, x, targets, cfg, **kw)

    monkeypatch.setattr(rounds_mod, "fit", spy_fit)
    run_rounds(_student(), p, _settings(output="hard"), FakeTeacher(truth, "hard"))
    assert targets_seen and all(dt == torch.long for dt in targets_seen)


def test_hard_mode_rejects_probabilities_from_the_teacher(pool):
    p, truth = pool
    with pytest.raises(TypeError, match="never probabilities"):
        run_rounds(_student(), p, _settings(output="hard"), FakeTeacher(truth, "soft"))


def test_vanilla_and_prompt_only_switches(pool, monkeypatch):
    p, truth = pool
    import aspkd_ray.aspkd.pseudo_labels as pl_mod

    called = []
    monkeypatch.setitem(pl_mod.RULES.entries, "paper", lambda inp: called.append(1) or None)
    teacher = FakeTeacher(truth, "soft")
    state = run_rounds(_student(), p, _settings(active=False, self_paced=False), teacher)
    assert teacher.calls == 40 and not called and state.pseudo == []
    teacher = FakeTeacher(truth, "soft")
    state = run_rounds(_student(), p, _settings(prompt_only=True), teacher)
    assert teacher.calls == 0 and len(state.bought_idx) == 0


class _Stop(Exception):
    pass


class _EmbedSpy:
    """The pool, recording the latents of every `embed` (selection, then pseudo-labels)."""

    def __init__(self, pool):
        self.pool, self.latents = pool, []

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def embed(self, model):
        out = self.pool.embed(model)
        self.latents.append(out)
        return out


def _round_picks(state):
    """What each round decided: bought indices and labels, pseudo-labelled ids and classes."""
    picks, start = [], 0
    for row, pseudo in zip(state.history, state.pseudo, strict=True):
        end = row["bought"]
        picks.append({"round": row["round"], "bought_idx": state.bought_idx[start:end],
                      "bought_labels": state.bought_labels[start:end],
                      "pseudo_idx": pseudo["idx"], "pseudo_classes": pseudo["classes"]})
        start = end
    return picks


def _assert_same_picks(got, want):
    assert [p["round"] for p in got] == [p["round"] for p in want]
    for g, w in zip(got, want, strict=True):
        for key in ("bought_idx", "bought_labels", "pseudo_idx", "pseudo_classes"):
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"round {g['round']} {key}")


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory):
    """One uninterrupted run, and runs stopped after round k (1, 2) then resumed from the
    round checkpoint as the Ray layer resumes (train/attack.py): state and weights saved
    with train/state_io.py after every round, read back, and loaded into a fresh student
    made like `attack._make_student` (seeded init, then the saved weights)."""
    from aspkd_ray.train.state_io import load_state, load_weights_file, save_state, save_weights

    p, truth = pool
    full_pool = _EmbedSpy(p)
    full = run_rounds(_student(), full_pool, _settings(), FakeTeacher(truth, "soft"))
    assert len(full_pool.latents) == 6  # per round: selection, then pseudo-labels
    resumed = {}
    for stop_after in (1, 2):
        root = tmp_path_factory.mktemp(f"stop-after-{stop_after}")

        def save_then_stop(state, model, root=root, stop_after=stop_after):
            folder = root / f"round-{state.round}"
            folder.mkdir()
            save_weights(model, folder)
            save_state(state, folder)
            if state.round == stop_after:
                raise _Stop

        first = FakeTeacher(truth, "soft")
        with pytest.raises(_Stop):
            run_rounds(_student(), p, _settings(), first, on_round=save_then_stop)
        assert len(first.asked) == stop_after  # it really stopped after round k

        checkpoint = root / f"round-{stop_after}"
        state = load_state(checkpoint)
        assert state.round == stop_after
        student = _student()
        student.load_state_dict(load_weights_file(checkpoint))
        teacher, spy = FakeTeacher(truth, "soft"), _EmbedSpy(p)
        resumed[stop_after] = (run_rounds(student, spy, _settings(), teacher, state=state),
                               teacher, spy.latents)
    return (full, full_pool.latents), resumed


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_buys_only_later_rounds_and_their_first_picks_match(runs, stop_after):
    (full, full_latents), resumed = runs
    state, teacher, latents = resumed[stop_after]
    want = _round_picks(full)
    # the resumed student is the full run's student after round k: the same latents for
    # round k+1's selection, bit for bit
    np.testing.assert_array_equal(latents[0], full_latents[2 * stop_after])
    assert len(want) == 3 and state.round == 3 and len(state.bought_idx) == 40
    # the finished rounds come back from the checkpoint unchanged
    _assert_same_picks(_round_picks(state)[:stop_after], want[:stop_after])
    # only the later rounds are bought, and the first of them buys what the full run bought
    # (its selection depends on the checkpoint's weights and the (seed, round) rng only)
    assert [len(a) for a in teacher.asked] == [13, 13, 14][stop_after:]
    np.testing.assert_array_equal(teacher.asked[0], want[stop_after]["bought_idx"])
    got = _round_picks(state)[stop_after]
    for key in ("bought_idx", "bought_labels"):
        np.testing.assert_array_equal(got[key], want[stop_after][key])


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_after_an_interruption_picks_what_an_uninterrupted_run_picks(runs, stop_after):
    (full, _), resumed = runs
    state, teacher, _ = resumed[stop_after]
    want = _round_picks(full)
    # every later round: bought indices and labels, pseudo-label ids and classes
    _assert_same_picks(_round_picks(state)[stop_after:], want[stop_after:])
    for asked, w in zip(teacher.asked, want[stop_after:], strict=True):
        np.testing.assert_array_equal(asked, w["bought_idx"])


def test_pretrain_fits_generation_classes_before_round_one_and_only_once(pool, monkeypatch):
    p, truth = pool
    fits = []
    real_fit = rounds_mod.fit

    def spy(model, x, targets, cfg, **kw):
        fits.append((len(x), targets.dtype))
        return real_fit(model, x, targets, cfg, **kw)

    monkeypatch.setattr(rounds_mod, "fit", spy)
    teacher = FakeTeacher(truth, "soft")
    state = run_rounds(_student(), p, _settings(pretrain=True), teacher)
    # the init step sees the whole pool with generation classes (ints), then the rounds run
    assert fits[0] == (len(p.x), torch.int64)
    assert state.pretrain is not None and state.pretrain["epochs"] == 1
    assert teacher.calls == 40 and len(fits) == 1 + 2 * 3
    # a resumed run (state after round 1) does not pre-train again
    fits.clear()
    state.round, state.bought_idx = 1, state.bought_idx[:13]
    state.bought_labels = state.bought_labels[:13]
    run_rounds(_student(), p, _settings(pretrain=True), FakeTeacher(truth, "soft"),
               state=state)
    assert len(fits) == 2 * 2 and fits[0][1] == torch.float32


def _run(pool_fixture, monkeypatch, output):
    p, truth = pool_fixture
    import aspkd_ray.aspkd.pseudo_labels as pl_mod

    fits, knn_refs = [], []
    real_fit, real_rule = rounds_mod.fit, pl_mod.get_pseudo_label_rule("paper")

    def fit_spy(model, x, targets, cfg, **kw):
        fits.append((targets.clone(), kw.get("class_weights")))
        return real_fit(model, x, targets, cfg, **kw)

    def knn_spy(inp):
        knn_refs.append(np.array(inp.reference_labels))
        return real_rule(inp)

    monkeypatch.setattr(rounds_mod, "fit", fit_spy)
    monkeypatch.setitem(pl_mod.RULES.entries, "paper", knn_spy)
    teacher = BiasedTeacher(truth, output)
    state = rounds_mod.run_rounds(_student(), p, _settings(output=output,
                                                           prior_correction=True), teacher)
    return state, fits, knn_refs


class BiasedTeacher:
    """Soft: mostly class 8 with the true class second; hard: class 8 for 3 of 4 images."""

    def __init__(self, truth, output):
        self.truth, self.output = truth, output

    def __call__(self, picks):
        t = self.truth[picks]
        if self.output == "hard":
            return np.where(np.arange(len(picks)) % 4 == 0, t, 8).astype(np.int64)
        q = np.full((len(picks), 10), 0.01, dtype=np.float32)
        q[np.arange(len(picks)), t] += 0.2
        q[:, 8] += 0.7
        return q / q.sum(1, keepdims=True)


def test_prior_correction_soft_rounds_train_and_label_with_corrected_answers(pool, monkeypatch):
    state, fits, knn_refs = _run(pool, monkeypatch, "soft")
    truth_bought = pool[1][state.bought_idx]
    # the state keeps what the teacher said; training and kNN see the corrected labels
    assert (state.bought_labels.argmax(1) == 8).mean() > 0.8
    first_targets = fits[0][0]
    assert (first_targets.argmax(1).numpy() == truth_bought[:len(first_targets)]).mean() > 0.9
    assert (knn_refs[-1].argmax(1) == truth_bought).mean() > 0.9
    assert all(w is None for _, w in fits)


def test_prior_correction_hard_rounds_use_class_weights_and_ints_only(pool, monkeypatch):
    state, fits, _ = _run(pool, monkeypatch, "hard")
    assert state.bought_labels.dtype == np.int64
    for targets, weights in fits:
        assert targets.dtype == torch.int64
        assert weights is not None and weights[8] < weights[[c for c in range(10) if c != 8]].min()
