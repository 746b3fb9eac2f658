"""Pseudo-label rules and selection strategies beyond the paper (aspkd/variants.py): each
test breaks if the entry's defining property breaks."""

import dataclasses

import numpy as np
import pytest

from aspkd_ray.aspkd.pseudo_labels import PseudoLabelInput, get_pseudo_label_rule
from aspkd_ray.aspkd.selection import SelectionInput, get_selection
from aspkd_ray.aspkd.variants import bounded_k, cap_per_class, kcenter_greedy, sharpen
from aspkd_ray.config import ASPKDConfig


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 3.0])
def test_sharpening_never_changes_a_labels_argmax(temperature):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=500).astype(np.float32)
    q = sharpen(p, temperature)
    assert np.array_equal(q.argmax(1), p.argmax(1))
    assert np.allclose(q.sum(1), 1.0, atol=1e-5)
    if temperature < 1:
        assert (q.max(1) >= p.max(1) - 1e-6).all() and (q.max(1) > p.max(1)).any()
    if temperature == 1.0:
        assert np.allclose(q, p, atol=1e-5)
    with pytest.raises(ValueError, match="pl_temperature"):
        sharpen(p, 0.0)


def test_k_is_bounded_by_the_references_per_class():
    assert bounded_k(5, 20, 10) == 2 and bounded_k(5, 640, 10) == 5 and bounded_k(5, 3, 10) == 1


def test_per_class_caps_hold_and_keep_the_most_confident():
    classes = np.array([0] * 10 + [1] * 2 + [2] * 2)
    score = np.arange(14, dtype=float)
    kept = np.ones(14, bool)
    out = cap_per_class(classes, score, kept, ratio=1.0, num_classes=3)
    cap = int(np.ceil(14 / 3))
    assert np.bincount(classes[out], minlength=3).max() <= cap
    assert np.array_equal(np.flatnonzero(out & (classes == 0)), np.arange(10 - cap, 10))
    assert out[10:].all()  # small classes untouched


def _input(mode="soft", **settings):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 5
    ref_classes = np.repeat(np.arange(4), 3)
    query_classes = rng.integers(0, 4, 200)
    reference = centres[ref_classes] + rng.normal(size=(12, 8))
    query = centres[query_classes] + rng.normal(size=(200, 8)) * 2.5
    labels = np.eye(4, dtype=np.float32)[ref_classes] * 0.7 + 0.075
    ref_labels = labels if mode == "soft" else ref_classes
    student = np.where(rng.random(200) < 0.8, query_classes, (query_classes + 1) % 4)
    return PseudoLabelInput(query=query.astype(np.float32),
                            reference=reference.astype(np.float32),
                            reference_labels=ref_labels, generation_classes=query_classes,
                            mode=mode, num_classes=4, distance="euclidean",
                            settings=dataclasses.replace(ASPKDConfig(), **settings),
                            student_classes=lambda: student), student


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_confident_rule_keeps_only_agreeing_neighbours_within_caps(mode):
    rule = get_pseudo_label_rule("confident")
    inp, student = _input(mode, pl_min_confidence=0.6, pl_class_cap=1.2,
                          pl_student_agreement=True, generation_class_filter=False)
    pl = rule(inp)
    assert pl.neighbours.shape[1] == 3  # k = 5 bounded by 3 references per class
    if mode == "soft":
        assert (pl.labels[pl.kept].max(1) >= 0.6).all()  # sharpened: still above τ
        assert np.array_equal(pl.labels.argmax(1), pl.classes)
    else:
        votes = (inp.reference_labels[pl.neighbours] == pl.classes[:, None]).mean(1)
        assert (votes[pl.kept] >= 0.6).all()
    assert (pl.classes[pl.kept] == student[pl.kept]).all()
    counts = np.bincount(pl.classes[pl.kept], minlength=4)
    assert counts.max() <= np.ceil(1.2 * counts.sum() / 4)
    assert 0 < pl.kept.sum() < len(pl.kept)
    assert pl.filter_rate == pytest.approx(1 - pl.kept.mean())
    loose = rule(_input(mode, pl_min_confidence=0.0, pl_class_cap=None,
                        generation_class_filter=False)[0])
    assert loose.kept.all()  # nothing asked, nothing dropped


def test_kcenter_never_picks_twice_nor_a_bought_image_and_goes_far():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(300, 5)).astype(np.float32)
    classes = np.repeat(np.arange(3), 100)
    bought = np.array([0, 100, 200])
    cand = np.setdiff1d(np.arange(300), bought)
    strategy = get_selection("kcenter")
    res = strategy(SelectionInput(quota=60, classes=classes, candidates=cand, num_classes=3,
                                  rng=rng, latents=lambda: latents, predicted=lambda: classes,
                                  settings=ASPKDConfig()))
    assert len(res.indices) == len(set(res.indices)) == 60
    assert not set(res.indices) & set(bought)
    assert (res.per_class == 20).all()
    # the first pick of a class is the candidate farthest from everything bought
    members = cand[classes[cand] == 1]
    first = kcenter_greedy(latents, members, bought, 1)[0]
    gaps = np.min(((latents[members, None] - latents[None, bought]) ** 2).sum(-1), 1)
    assert first == members[np.argmax(gaps)]
    # asking for every candidate returns each exactly once
    assert sorted(kcenter_greedy(latents, members, bought, len(members))) == list(members)


def test_weight_average_follows_its_decay():
    import torch

    from aspkd_ray.aspkd.distill import WeightAverage

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    frozen, live = WeightAverage(net, 1.0, False), WeightAverage(net, 0.0, False)
    half, warm = WeightAverage(net, 0.5, False), WeightAverage(net, 0.999)
    with torch.no_grad():
        net[0].weight.add_(2.0)
    for avg in (frozen, live, half, warm):
        avg.update(net)
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    frozen.copy_to(target)
    assert torch.equal(target[0].weight, start["0.weight"])
    live.copy_to(target)
    assert torch.equal(target[0].weight, net[0].weight)
    half.copy_to(target)
    assert torch.allclose(target[0].weight, start["0.weight"] + 1.0)
    warm.copy_to(target)  # step 1 of a warmed-up average: decay 2/11, not 0.999
    assert torch.allclose(target[0].weight, start["0.weight"] + 2.0 * 9 / 11)
    assert target[1].num_batches_tracked.dtype == torch.long  # integer buffers left alone


def test_fit_with_ema_ends_on_the_average():
    import torch

    from aspkd_ray.aspkd.distill import fit
    from aspkd_ray.config import TrainingConfig

    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    cfg = TrainingConfig(max_epochs=3, early_stopping="none", augment=False, batch_size=16)
    ends = []
    for ema in (None, 1e-9, 0.9):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        first = net.weight.detach().clone()
        fit(net, x, y, dataclasses.replace(cfg, ema=ema))
        ends.append((first, net.weight.detach().clone()))
    (first, plain), (first_again, last), (_, averaged) = ends
    assert not torch.equal(plain, first)          # training moved the weights
    assert torch.equal(first, first_again) and torch.equal(last, plain)  # decay ~0: last step
    assert not torch.allclose(averaged, plain)    # decay 0.9: the average, not the last step


def _uncertain_input(quota=12):
    rng = np.random.default_rng(3)
    classes = np.repeat(np.arange(3), 40)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=120)
    cand = np.arange(6, 120)
    latents = rng.normal(size=(120, 4))
    return SelectionInput(quota=quota, classes=classes, candidates=cand, num_classes=3, rng=rng,
                          latents=lambda: latents, predicted=lambda: probs.argmax(1),
                          settings=ASPKDConfig(), probabilities=lambda: probs), probs


@pytest.mark.parametrize("kind", ["margin", "entropy"])
def test_uncertainty_strategies_pick_the_least_sure_of_each_class(kind):
    from aspkd_ray.aspkd.variants import uncertainty

    inp, probs = _uncertain_input()
    res = get_selection(kind)(inp)
    score = uncertainty(probs, kind)
    assert (res.per_class == 4).all() and len(set(res.indices)) == 12
    for c in range(3):
        members = inp.candidates[inp.classes[inp.candidates] == c]
        picked = res.indices[inp.classes[res.indices] == c]
        assert score[picked].min() >= np.sort(score[members])[-4]
    sure = np.eye(4)[[0, 1]] * 0.9 + 0.025
    assert uncertainty(sure, kind).max() < uncertainty(np.full((1, 4), 0.25), kind)[0]


def test_margin_kcenter_picks_diverse_images_among_the_uncertain():
    from aspkd_ray.aspkd.variants import uncertainty

    inp, probs = _uncertain_input(quota=6)
    res = get_selection("margin_kcenter")(inp)
    score = uncertainty(probs, "margin")
    assert len(set(res.indices)) == 6 and (res.per_class == 2).all()
    for c in range(3):
        members = inp.candidates[inp.classes[inp.candidates] == c]
        picked = res.indices[inp.classes[res.indices] == c]
        assert score[picked].min() >= np.sort(score[members])[-6]  # among the 3 x 2 least sure


def test_uncertainty_needs_the_students_probabilities():
    inp, _ = _uncertain_input()
    with pytest.raises(ValueError, match="aspkd.selection=margin needs"):
        get_selection("margin")(dataclasses.replace(inp, probabilities=None))


def test_proxy_frame_centres_the_image_on_black():
    from aspkd_ray.generation.backends import to_victim_format

    img = np.full((16, 16), 200, np.uint8)
    full = to_victim_format([img], 28, 1)
    framed = to_victim_format([img], 28, 1, frame=20 / 28)
    assert (full == 200).all()
    assert framed.shape == (1, 28, 28, 1)
    assert (framed[0, 4:24, 4:24] == 200).all()
    inside = np.zeros((28, 28), bool)
    inside[4:24, 4:24] = True
    assert (framed[0, ~inside] == 0).all()


def _same(a, b) -> bool:
    return (a.neighbours.shape == b.neighbours.shape and np.array_equal(a.kept, b.kept)
            and np.array_equal(a.classes, b.classes) and np.allclose(a.labels, b.labels))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_adaptive_rule_is_confident_while_scarce_and_the_papers_after(mode):
    inp, _ = _input(mode)  # 3 bought images a class, k = 5: scarce
    adaptive, confident, paper = (get_pseudo_label_rule(n) for n in
                                  ("adaptive", "confident", "paper"))
    assert _same(adaptive(inp), confident(inp)) and not _same(adaptive(inp), paper(inp))
    plenty = dataclasses.replace(inp, settings=dataclasses.replace(
        inp.settings, k=3, pl_min_confidence=1.0))  # 3 a class: enough; confident would drop
    assert _same(adaptive(plenty), paper(plenty)) and not _same(adaptive(plenty),
                                                                  confident(plenty))


def test_variant_paper_restores_algorithm_1_over_any_config():
    from aspkd_ray.config import ConfigError, from_dict, load
    from aspkd_ray.config.variants import get_variant

    tuned = {"student": {"pretrain": "proxy_prompts"},
             "aspkd": {"prior_correction": True, "pseudo_labels": "confident", "k": 3},
             "proxy": {"frame": 0.7}, "training": {"ema": 0.99}}
    cfg = from_dict(tuned, ["aspkd.variant=paper"])
    for key, value in get_variant("paper"):
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key
    # --set goes above the variant: a deliberate change to one part of it
    assert from_dict(tuned, ["aspkd.variant=paper", "aspkd.k=3"]).aspkd.k == 3
    # a file that names the variant and contradicts it says which key
    with pytest.raises(ConfigError, match="aspkd.pseudo_labels"):
        from_dict({"aspkd": {"variant": "paper", "pseudo_labels": "confident"}})
    with pytest.raises(ConfigError, match="aspkd.variant: got 'papr'"):
        load("digits", ["aspkd.variant=papr"])
    assert load("digits").aspkd.variant is None  # no preset unless asked for


def test_sklearn_digits_is_a_new_pairing_sharing_the_mnist_generator():
    from aspkd_ray.config import load
    from aspkd_ray.datasets import load_generator_data, load_victim_data
    from aspkd_ray.generation.train_ddpm import generator_location
    from aspkd_ray.jobs.demo import proxy_cache_dir
    from aspkd_ray.layout import victim_location

    train, test = (load_victim_data("sklearn-digits", s) for s in ("train", "test"))
    assert len(train) + len(test) == 1797 and 0.3 < len(test) / 1797 < 0.37
    assert set(np.bincount(test.labels)) <= set(range(55, 65))
    assert train.images.shape[1:] == (28, 28, 1) and train.images[:, :3].max() == 0
    # disjoint splits: no test image is also a victim training image
    seen = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in seen for img in test.images) < 5  # (sklearn has duplicates)
    held, digits = load("sklearn-digits"), load("digits")
    gen = load_generator_data("sklearn-digits")
    assert np.array_equal(gen.images, load_generator_data("digits").images)
    assert generator_location(held) == generator_location(digits)
    assert proxy_cache_dir(held) == proxy_cache_dir(digits)
    assert victim_location(held) != victim_location(digits)


@pytest.mark.parametrize("scenario", ["digits", "digits-xdomain", "sklearn-digits"])
def test_every_variant_loads_on_every_embedded_scenario_and_sets_its_keys(scenario):
    from aspkd_ray.config import load, to_dict
    from aspkd_ray.config.variants import get_variant, list_variants

    assert {"paper", "aspkd_ray"} <= set(list_variants())
    for name in list_variants():
        flat = to_dict(load(scenario, [f"aspkd.variant={name}"]))
        for key, value in get_variant(name):
            section, field = key.split(".")
            assert flat[section][field] == value, (name, key)


def test_teacher_prior_quotas_steer_calls_to_rare_teacher_classes():
    from aspkd_ray.aspkd.selection import _class_quotas, random_select, teacher_prior_share

    # the teacher calls every image of generation classes 0-7 "0", and 8, 9 what they are
    gen = np.repeat(np.arange(10), 4)
    hard = np.where(gen >= 8, gen, 0)
    for labels in (hard, np.eye(10, dtype=np.float32)[hard]):
        share = teacher_prior_share(gen, labels, 10)
        assert share[8] == share[9] > share[1] and share.max() <= 3.0
    quotas = _class_quotas(np.full(10, 50), 40, np.random.default_rng(0), share)
    assert quotas.sum() == 40 and quotas[8] > quotas[1] and quotas[9] > quotas[2]
    # a class with few candidates gives what it has; the rest goes elsewhere
    small = _class_quotas(np.array([50] * 8 + [2, 2]), 40, np.random.default_rng(0), share)
    assert small.sum() == 40 and small[8] == small[9] == 2
    assert teacher_prior_share(gen[:0], hard[:0], 10) is None  # round 1: equal quotas
    # with no share the paper's equal quotas are drawn exactly as before
    a = random_select(np.repeat(np.arange(10), 20), 30, 10, rng=np.random.default_rng(3))
    b = random_select(np.repeat(np.arange(10), 20), 30, 10, rng=np.random.default_rng(3),
                      class_share=None)
    assert np.array_equal(a.indices, b.indices) and (a.per_class == 3).all()


def test_the_round_loop_passes_teacher_prior_quotas_only_when_asked():
    from types import SimpleNamespace

    from aspkd_ray.aspkd.rounds import _class_share

    state = SimpleNamespace(bought_idx=np.arange(20), bought_labels=np.zeros(20, np.int64))
    classes = np.repeat(np.arange(10), 2)
    for quotas, expect_none in (("equal", True), ("teacher_prior", False)):
        s = SimpleNamespace(aspkd=dataclasses.replace(ASPKDConfig(), quotas=quotas),
                            num_classes=10)
        assert (_class_share(s, classes, state) is None) == expect_none
