"""Teacher class-prior correction (aspkd/prior.py) and its use in the round loop."""

import numpy as np
import torch

from aspkd_ray.aspkd.distill import distillation_loss
from aspkd_ray.aspkd.prior import class_weights, correct_soft_labels, teacher_prior


def _biased_answers(n=400, c=5, bias_class=3, seed=0):
    """A teacher that knows the class (second choice) but calls most images `bias_class`."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, c, n)
    q = np.full((n, c), 0.02)
    q[np.arange(n), truth] = 0.3
    q[:, bias_class] += 0.6
    q += rng.uniform(0, 0.02, q.shape)
    return (q / q.sum(1, keepdims=True)).astype(np.float32), truth


def test_prior_is_the_smoothed_mean_answer_and_never_zero():
    soft = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(teacher_prior(soft, 3), [2.5 / 5, 1.5 / 5, 1 / 5])
    hard = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(teacher_prior(hard, 3), [4 / 7, 2 / 7, 1 / 7])
    assert teacher_prior(hard, 3).sum() == 1.0


def test_correction_removes_a_one_class_bias_and_keeps_rows_normalised():
    q, truth = _biased_answers()
    assert (q.argmax(1) == truth).mean() < 0.3          # the raw answers say "3" mostly
    fixed = correct_soft_labels(q, teacher_prior(q, 5))
    np.testing.assert_allclose(fixed.sum(1), 1.0, rtol=1e-5)
    assert (fixed.argmax(1) == truth).mean() > 0.95     # the class comes back


def test_uniform_prior_changes_nothing():
    q, _ = _biased_answers()
    np.testing.assert_allclose(correct_soft_labels(q, np.full(5, 0.2)), q, rtol=1e-5)


def test_class_weights_favour_rare_classes_and_average_one():
    w = class_weights(np.array([0.7, 0.2, 0.1]))
    assert w[0] < w[1] < w[2]
    assert abs(w.mean() - 1.0) < 1e-6


def test_hard_loss_uses_class_weights():
    logits, y = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 2])
    w = torch.tensor([0.2, 1.4, 1.4])
    assert torch.isclose(distillation_loss(logits, y, w),
                         torch.nn.functional.cross_entropy(logits, y, weight=w))
    assert not torch.isclose(distillation_loss(logits, y, w), distillation_loss(logits, y))
