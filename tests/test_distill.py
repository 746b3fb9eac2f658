import copy

import torch

from aspkd_ray.aspkd.distill import distillation_loss, fit
from aspkd_ray.config import TrainingConfig
from aspkd_ray.models import create_model


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def test_early_stopping_restores_the_best_weights_not_a_reference():
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    x, y = _data()
    scores = iter([10.0, 50.0, 20.0, 30.0, 5.0, 1.0, 1.0, 1.0])
    snapshots = {}

    def validate(m):
        snapshots[len(snapshots)] = copy.deepcopy(m.state_dict())
        return next(scores)

    cfg = TrainingConfig(max_epochs=8, patience=3, batch_size=16, lr=1e-2, augment=False)
    res = fit(model, x, y, cfg, validate=validate)
    assert res.best_epoch == 1 and res.best_score == 50.0
    assert res.epochs_run == 5  # epochs 2, 3, 4 without improvement → stop
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    # and it really changed after the best epoch (so restoring was needed)
    assert any(not torch.equal(snapshots[1][k], snapshots[4][k]) for k in snapshots[1])


def test_soft_and_hard_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    hard = torch.tensor([0, 1])
    soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(distillation_loss(logits, hard), distillation_loss(logits, soft))
    # a soft target that prefers class 1 gives a larger loss on logits that prefer class 0
    assert distillation_loss(logits[:1], torch.tensor([[0.2, 0.8]])) > distillation_loss(
        logits[:1], torch.tensor([[0.8, 0.2]]))


def test_fit_learns_a_separable_problem():
    torch.manual_seed(0)
    x = torch.zeros(200, 1, 28, 28)
    y = torch.arange(200) % 2
    x[y == 1, :, :14] = 1.0  # class 1: bright top half
    model = create_model("digits_cnn_small", num_classes=2, in_chans=1, image_size=28)
    cfg = TrainingConfig(max_epochs=5, batch_size=32, lr=3e-3, augment=True,
                         early_stopping="none")
    fit(model, x, y, cfg)
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
