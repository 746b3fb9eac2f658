import pytest
import torch

from aspkd_ray.models import create_model, list_models, load_checkpoint, save_checkpoint

# (name, image size, channels, latent map shape (C, H, W) or tokens, embed dim)
EXPECTED = [
    ("digits_cnn", 28, 1, (64, 7, 7), 3136),
    ("digits_cnn_small", 28, 1, (32, 7, 7), 1568),
    ("patch_cnn", 224, 3, (32, 4, 4), 512),
    ("alexnet", 32, 3, (256, 4, 4), 4096),
    ("half_alexnet", 32, 3, (128, 4, 4), 2048),
    ("alexnet", 224, 3, (256, 6, 6), 9216),
    ("half_alexnet", 224, 3, (128, 6, 6), 4608),
    ("resnet18", 32, 3, (512, 1, 1), 512),
    ("resnet50", 32, 3, (2048, 1, 1), 2048),
    ("fastvit", 224, 3, (768, 7, 7), 768),
    ("vit_b", 224, 3, (197, 768), 768),
]


def test_registry_covers_paper_models():
    assert {"alexnet", "resnet50", "vit_b", "digits_cnn"} <= set(list_models("teacher"))
    assert {"half_alexnet", "resnet18", "fastvit", "digits_cnn_small"} <= set(
        list_models("student"))
    tested = {name for name, *_ in EXPECTED}
    assert tested == set(list_models()), "every registered model needs a shape test"


@pytest.mark.parametrize("name, size, chans, latent, dim", EXPECTED,
                         ids=[f"{e[0]}-{e[1]}" for e in EXPECTED])
def test_forward_split_shapes(name, size, chans, latent, dim):
    model = create_model(name, num_classes=7, in_chans=chans, image_size=size).eval()
    x = torch.rand(2, chans, size, size)
    with torch.no_grad():
        f = model.forward_features(x)
        logits = model.forward_head(f)
        e = model.embed(x)
        alone_logits, alone_embed = model(x[1:]), model.embed(x[1:])
    assert tuple(f.shape[1:]) == latent
    assert logits.shape == (2, 7) and e.shape == (2, dim)
    # Each image's latent and logits depend on that image alone (eval mode: no batch
    # statistics, no dropout), and tell different images apart: what active selection and
    # the kNN pseudo-labels need from S̄.
    torch.testing.assert_close(alone_logits, logits[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone_embed, e[1:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(logits[0], logits[1])


def test_half_alexnet_is_half_of_alexnet():
    a = create_model("alexnet", num_classes=10, in_chans=3, image_size=224)
    h = create_model("half_alexnet", num_classes=10, in_chans=3, image_size=224)
    conv_a = [m.out_channels for m in a.features if isinstance(m, torch.nn.Conv2d)]
    conv_h = [m.out_channels for m in h.features if isinstance(m, torch.nn.Conv2d)]
    assert conv_h == [c // 2 for c in conv_a]
    fc_a = [m.out_features for m in a.head if isinstance(m, torch.nn.Linear)][:-1]
    fc_h = [m.out_features for m in h.head if isinstance(m, torch.nn.Linear)][:-1]
    assert fc_h == [c // 2 for c in fc_a]


def test_unknown_model_error_lists_choices():
    with pytest.raises(ValueError, match="half_alexnet"):
        create_model("alexnett", num_classes=10, in_chans=3, image_size=32)


def test_checkpoint_round_trip(tmp_path):
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_checkpoint(model, tmp_path / "ck")
    again = load_checkpoint(tmp_path / "ck").eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k


def test_init_from_torch_file_weights_only(tmp_path):
    from aspkd_ray.models import load_weights

    src = create_model("digits_cnn_small", num_classes=10, in_chans=1, image_size=28)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = load_weights(create_model("digits_cnn_small", num_classes=10, in_chans=1,
                                    image_size=28), tmp_path / "w.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
