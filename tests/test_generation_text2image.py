"""The text-to-image and plugin backends through the code users run, offline.

A tiny Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder and a
tokenizer built from a small local vocabulary) is saved with `save_pretrained` and loaded by
path, exactly as a hub id would be.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from aspkd_ray.config import from_dict
from aspkd_ray.generation import generate_proxy, load_proxy_set

pytestmark = pytest.mark.timeout(300)


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    # Byte-level BPE over single characters: every lower-case prompt tokenizes.
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         pad_token="!", model_max_length=16)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    tokenizer = _tokenizer(root)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=2))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    path = root / "pipeline"
    pipe.save_pretrained(path)
    return path


def _cfg(**generator):
    return from_dict({"seed": 5, "generator": {"resolution": 16, "steps": 2,
                                               "guidance_scale": 3.0, "batch_size": 2,
                                               **generator},
                      "proxy": {"per_class": None, "total": 6}})


def test_tiny_pipeline_reloads_by_path_and_is_seeded(tiny_sd):
    from aspkd_ray.generation.text2image import DiffusersText2Image

    assert (tiny_sd / "model_index.json").is_file()
    gen = DiffusersText2Image(str(tiny_sd), scheduler="euler", steps=2, resolution=16)
    assert type(gen.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    a = gen(["a photo of a three", "an image of a one"], [3, 1], [11, 12])
    b = gen(["a photo of a three"], [3], [11])
    assert a[0].shape == (16, 16, 3) and a[0].dtype == np.uint8
    # An image depends on its seed, not its batch: batch size changes the float kernels'
    # blocking, so a pixel may round the other way (measured: 1 of 768 off by 1), no more.
    batching = np.abs(a[0].astype(int) - b[0].astype(int))
    assert batching.max() <= 2 and (batching > 0).mean() < 0.02
    other_seed = np.abs(a[0].astype(int) - gen(["a photo of a three"], [3], [13])[0])
    assert other_seed.mean() > 10 * max(batching.mean(), 0.1)


def test_missing_pipeline_error_names_the_setting(tmp_path):
    from aspkd_ray.generation.text2image import DiffusersText2Image

    with pytest.raises(FileNotFoundError, match="generator.model"):
        DiffusersText2Image(str(tmp_path / "nothing-here"))


@pytest.mark.slow
def test_generate_with_a_diffusers_pipeline_on_ray(ray_session, tiny_sd, tmp_path):
    cfg = _cfg(kind="diffusers", model=str(tiny_sd))
    manifest = generate_proxy(cfg, tmp_path)
    assert manifest["num_samples"] == 6 and manifest["generator"].startswith("diffusers:")
    ps = load_proxy_set(tmp_path / "proxy")
    assert ps.images.shape == (6, 28, 28, 1)  # 16 x 16 RGB made 28 x 28 grey for the victim
    assert all(p.startswith(("An image of a ", "A photo of a ")) for p in ps.prompts)
    assert all(ps.class_names[c] in p for c, p in zip(ps.classes, ps.prompts, strict=True))


PLUGIN = '''
import numpy as np

def make(config, class_names, device):
    def generate(prompts, class_ids, seeds):
        return [np.full((12, 12), 20 * c, np.uint8) for c in class_ids]
    return generate
'''


def test_generate_with_a_plugin_by_file_path(ray_session, tmp_path):
    plugin = tmp_path / "my_generator.py"
    plugin.write_text(PLUGIN)
    cfg = _cfg(kind="plugin", plugin=f"{plugin}:make")
    generate_proxy(cfg, tmp_path / "out")
    ps = load_proxy_set(tmp_path / "out" / "proxy")
    assert len(ps) == 6
    for img, c in zip(ps.images, ps.classes, strict=True):  # each image came from its class
        assert (img == 20 * c).all()
