"""Every registered generator kind and victim protocol, run through its contract, cheaply.

A new kind or protocol must add its case below (the first test of each part fails until it
does): generators are built from tiny models made here (an untrained DDPM UNet, a tiny
Stable Diffusion pipeline, the shapes plugin) and called with two prompts; protocols encode
a small float batch and decode a well-formed answer, soft and hard, also through HttpVictim
with a stand-in session (no server, no network).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aspkd_ray.config import Config, ConfigError, GeneratorConfig, VictimConfig, from_dict
from aspkd_ray.generation import registry
from aspkd_ray.generation.backends import build_generator, to_victim_format
from aspkd_ray.generation.plan import generator_id
from aspkd_ray.generation.registry import (
    GeneratorKind,
    check_generator,
    get_generator,
    list_generators,
    prepare_generator,
    register_generator,
)
from aspkd_ray.teacher import http_victim
from aspkd_ray.teacher.errors import InvalidAnswer
from aspkd_ray.teacher.http_victim import (
    HttpVictim,
    Protocol,
    get_protocol,
    list_protocols,
    register_protocol,
)

pytestmark = pytest.mark.timeout(300)

CLASSES = tuple(str(k) for k in range(10))  # the default data set (digits) has 10 classes


# ---- generators: a tiny config per kind -------------------------------------------------


def _tiny_ddpm(root: Path) -> dict:
    """An untrained class-conditional UNet saved as the embedded kind saves a trained one:
    ready to load, so prepare() has nothing to train."""
    import torch

    from aspkd_ray.generation.ddpm import build_unet, train_scheduler
    from aspkd_ray.generation.train_ddpm import _save_pipeline

    torch.manual_seed(0)
    folder = root / "tiny-ddpm"
    _save_pipeline(folder, build_unet(len(CLASSES), 1, 8, [8, 8]), train_scheduler())
    return {"kind": "ddpm", "model": str(folder), "steps": 2, "resolution": 8}


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         pad_token="!", model_max_length=16)


def _tiny_diffusers(root: Path) -> dict:
    """A tiny Stable Diffusion pipeline saved with save_pretrained, loaded by path (as
    tests/test_generation_text2image.py does)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

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
    pipe.save_pretrained(root / "pipeline")
    return {"kind": "diffusers", "model": str(root / "pipeline"), "steps": 2,
            "guidance_scale": 3.0, "resolution": 16}


def _shapes_plugin(root: Path) -> dict:
    return {"kind": "plugin", "plugin": "aspkd_ray.generation.shapes:shapes",
            "resolution": 16}


# kind -> the generator section of a tiny config of that kind (files under the given folder)
GENERATOR_CASES: dict[str, Callable[[Path], dict]] = {
    "ddpm": _tiny_ddpm,
    "diffusers": _tiny_diffusers,
    "plugin": _shapes_plugin,
}


def _config(section: dict) -> Config:
    return from_dict({"seed": 3, "generator": {**section, "batch_size": 2},
                      "proxy": {"per_class": None, "total": 4}})


def test_every_registered_generator_has_a_contract_case():
    assert list_generators() == sorted(GENERATOR_CASES), \
        "a registered generator kind needs a tiny case in GENERATOR_CASES"


def test_generator_kind_has_no_static_choices():
    kind = {f.name: f for f in dataclasses.fields(GeneratorConfig)}["kind"]
    assert kind.metadata["choices"] is None and "registered" in kind.metadata["doc"]


@pytest.mark.parametrize("name", sorted(GENERATOR_CASES))
def test_generator_contract(name, tmp_path):
    section = GENERATOR_CASES[name](tmp_path)
    cfg = _config(section)
    kind = get_generator(name)
    for hook in ("validate", "check", "prepare", "resolve", "identity", "build"):
        assert callable(getattr(kind, hook, None)), f"{name} lacks {hook}()"
    assert isinstance(kind.one_actor_per_cpu, bool)

    kind.validate(cfg)
    kind.check(cfg)
    kind.prepare(cfg)  # ready as built here: nothing to train or fetch
    check_generator(cfg)
    prepare_generator(cfg)

    # identity: a non-empty string, the same for the same settings (another load of the
    # config, another call), and the model part of the id that every sample id hashes.
    ident = kind.identity(cfg)
    assert isinstance(ident, str) and ident
    assert kind.identity(_config(section)) == ident == kind.identity(cfg)
    assert generator_id(cfg).startswith(f"{name}:{ident}:")
    assert generator_id(_config(section)) == generator_id(cfg)

    resolved = kind.resolve(cfg)  # what the actors get
    assert isinstance(resolved, Config)
    assert resolved.generator.kind == name

    generate = build_generator(resolved, CLASSES, device="cpu")
    images = generate(["A photo of a 1", "A photo of a 7"], [1, 7], [11, 12])
    assert len(images) == 2
    out = to_victim_format(images, 8, 1)
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.uint8


def test_unknown_generator_kind_fails_at_config_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"generator\.kind: got 'glide'.*ddpm, diffusers, "
                                          r"plugin"):
        from_dict({}, ["generator.kind=glide"])


def test_a_registered_kind_is_accepted_and_asked_everything(monkeypatch, tmp_path):
    """One register call adds a kind: config load, checks, preparation, ids and building go
    through it, with no other change anywhere."""
    list_generators()  # built-ins registered before the registry is swapped for a copy
    monkeypatch.setattr(registry.KINDS, "entries", dict(registry.KINDS.entries))
    calls: list[str] = []

    @register_generator("noise")
    class NoiseKind(GeneratorKind):
        one_actor_per_cpu = True

        def validate(self, cfg: Config) -> None:
            calls.append("validate")
            if cfg.generator.model is None:
                raise ConfigError("generator.model: required for kind noise.")

        def check(self, cfg: Config) -> None:
            calls.append("check")

        def prepare(self, cfg: Config) -> None:
            calls.append("prepare")

        def identity(self, cfg: Config) -> str:
            return f"noise-{cfg.generator.model}"

        def build(self, cfg, class_names, device=None):
            def generate(prompts, class_ids, seeds):
                return [np.random.default_rng(s).integers(0, 256, (4, 4, 3), np.uint8)
                        for s in seeds]
            return generate

    assert "noise" in list_generators()
    with pytest.raises(ConfigError, match="generator.model"):
        from_dict({}, ["generator.kind=noise"])
    cfg = from_dict({}, ["generator.kind=noise", "generator.model=v1"])
    check_generator(cfg)
    prepare_generator(cfg)
    assert calls == ["validate", "validate", "check", "prepare"]
    assert generator_id(cfg).startswith("noise:noise-v1:")
    assert len(build_generator(cfg, CLASSES)(["a", "b"], [0, 1], [1, 2])) == 2


# ---- protocols: how a server is spoken to and what it answers -------------------------


def _mlflow_answer(arr: np.ndarray) -> object:
    return {"predictions": arr.tolist()}


def _mlflow_request(body: object) -> np.ndarray:
    return np.asarray(body["inputs"], dtype=np.float32)


def _v2_answer(arr: np.ndarray) -> object:
    return {"model_name": "m", "outputs": [{"name": "output", "shape": list(arr.shape),
                                            "datatype": "FP32" if arr.dtype.kind == "f"
                                            else "INT64", "data": arr.ravel().tolist()}]}


def _v2_request(body: object) -> np.ndarray:
    (tensor,) = body["inputs"]
    assert tensor["datatype"] == "FP32" and tensor["name"] == "input"
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


# protocol -> (a well-formed server answer holding this array, the batch a request carries)
PROTOCOL_CASES: dict[str, tuple[Callable[[np.ndarray], object],
                                Callable[[object], np.ndarray]]] = {
    "mlflow": (_mlflow_answer, _mlflow_request),
    "v2": (_v2_answer, _v2_request),
}

BATCH = np.random.default_rng(0).random((2, 1, 4, 4), dtype=np.float32)
SOFT = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
HARD = np.array([0, 2])


def test_every_registered_protocol_has_a_contract_case():
    assert list_protocols() == sorted(PROTOCOL_CASES), \
        "a registered protocol needs an answer/request case in PROTOCOL_CASES"


def test_victim_protocol_has_no_static_choices():
    protocol = {f.name: f for f in dataclasses.fields(VictimConfig)}["protocol"]
    assert protocol.metadata["choices"] is None and "registered" in protocol.metadata["doc"]


@pytest.mark.parametrize("name", sorted(PROTOCOL_CASES))
def test_protocol_contract(name):
    answer, request = PROTOCOL_CASES[name]
    proto = get_protocol(name)
    assert isinstance(proto, Protocol)

    body = proto.encode(BATCH, input_name="input")
    sent = json.loads(json.dumps(body))  # a JSON body, as requests sends it
    np.testing.assert_array_equal(request(sent), BATCH)

    soft = proto.decode(json.loads(json.dumps(answer(SOFT))), output="soft")
    np.testing.assert_allclose(soft, SOFT, rtol=1e-6)
    hard = proto.decode(json.loads(json.dumps(answer(HARD))), output="hard")
    np.testing.assert_array_equal(hard, HARD)
    assert hard.dtype.kind in "iu"
    with pytest.raises(InvalidAnswer):
        proto.decode("maintenance", output="soft")

    path = proto.path("m")
    assert path.startswith("/") and "?" not in path
    headers = proto.headers()
    assert headers.get("Content-Type") == "application/json"
    assert "Authorization" not in headers  # the victim's, never a protocol's


class _Response:
    status_code, text = 200, ""

    def __init__(self, body: object) -> None:
        self._body = body

    def json(self) -> object:
        return self._body


class _Session:
    """Stands in for requests.Session: records what is posted, answers `body`."""

    def __init__(self, body: object) -> None:
        self.body, self.posts = body, []

    def mount(self, prefix: str, adapter: object) -> None:
        pass

    def post(self, url: str, json: object, headers: dict, timeout: float) -> _Response:
        self.posts.append((url, json, headers))
        return _Response(self.body)


@pytest.mark.parametrize("output", ["soft", "hard"])
@pytest.mark.parametrize("name", sorted(PROTOCOL_CASES))
def test_protocol_through_the_victim(name, output):
    answer, request = PROTOCOL_CASES[name]
    session = _Session(answer(SOFT))  # a server that gives scores: hard keeps the argmax
    victim = HttpVictim("http://127.0.0.1:9/", protocol=name, output=output, num_classes=3,
                        model_name="m", session=session)
    got = victim.predict(BATCH)
    expected = SOFT if output == "soft" else SOFT.argmax(1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ((url, body, headers),) = session.posts
    assert url == "http://127.0.0.1:9" + get_protocol(name).path("m")
    np.testing.assert_array_equal(request(body), BATCH)
    assert headers == get_protocol(name).headers()
    assert victim.name.startswith(f"{name}:")


def test_unknown_protocol_fails_at_config_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"victim\.protocol: got 'grpc'.*mlflow, v2"):
        from_dict({}, ["victim.protocol=grpc"])
    with pytest.raises(ValueError, match="grpc"):
        HttpVictim("http://127.0.0.1:9", protocol="grpc", num_classes=3)


def test_a_registered_protocol_is_accepted_and_spoken(monkeypatch):
    """One register call adds a protocol: config load accepts it, its check runs there, and
    the victim speaks it."""
    monkeypatch.setattr(http_victim.PROTOCOLS, "entries", dict(http_victim.PROTOCOLS.entries))

    @register_protocol("scores")
    class ScoresProtocol(Protocol):
        def validate(self, cfg: Config) -> None:
            if cfg.victim.endpoint and cfg.victim.model_name is None:
                raise ConfigError("victim.model_name: required for the scores protocol.")

        def path(self, model_name: str | None) -> str:
            return f"/score/{model_name}"

        def headers(self) -> dict[str, str]:
            return {"Content-Type": "application/json", "X-Api": "1"}

        def encode(self, batch: np.ndarray, *, input_name: str = "input") -> object:
            return {"x": batch.tolist()}

        def decode(self, body: object, *, output: str, clean=str) -> np.ndarray:
            if not isinstance(body, dict) or "y" not in body:
                raise InvalidAnswer("no y")
            return np.asarray(body["y"])

    with pytest.raises(ConfigError, match="victim.model_name"):
        from_dict({}, ["victim.protocol=scores", "victim.endpoint=http://127.0.0.1:9"])
    cfg = from_dict({}, ["victim.protocol=scores", "victim.endpoint=http://127.0.0.1:9",
                         "victim.model_name=m"])
    session = _Session({"y": SOFT.tolist()})
    victim = HttpVictim(cfg.victim.endpoint, protocol=cfg.victim.protocol, num_classes=3,
                        model_name=cfg.victim.model_name, session=session)
    np.testing.assert_allclose(victim.predict(BATCH), SOFT)
    ((url, body, headers),) = session.posts
    assert url == "http://127.0.0.1:9/score/m" and headers["X-Api"] == "1"
    assert np.asarray(body["x"]).shape == BATCH.shape
