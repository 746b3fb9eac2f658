"""The cluster recipes in cluster/ are checked without a cluster (and without Docker: the
Dockerfile is read, never built).

- the launcher config validates against the JSON schema that the installed Ray ships;
- the KubeRay manifests mount a memory-backed /dev/shm, take ASPKD_STORAGE_ROOT and
  MLFLOW_TRACKING_URI from the settings ConfigMap, name the image cluster/Dockerfile builds,
  and run their $-commands on the Ray head (KubeRay's submitter has none of that environment);
- every `aspkd ...` command in the manifests, the launcher config, cluster/README.md,
  cluster/local.sh and the Dockerfile names a real subcommand, uses only its flags, and its
  --config / --sweep / --set values resolve and validate;
- the Dockerfile starts from a Ray GPU image of the pinned Ray version, installs this
  repository and swaps faiss-cpu for faiss-gpu; the package ships tune_configs/.

Each checker returns a list of problems; the `*_can_fail` tests feed it broken input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from aspkd_ray.cli.main import build_parser
from aspkd_ray.config import Config, ConfigError, from_dict
from aspkd_ray.config.packaged import packaged_config_names, resolve_config_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
REQUIRED_ENV = ("ASPKD_STORAGE_ROOT", "MLFLOW_TRACKING_URI")
# Stand-ins for environment variables in commands (the real values exist only on a cluster).
DUMMY_ENV = {"ASPKD_STORAGE_ROOT": "s3://dummy-bucket/aspkd",
             "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
             "RAY_HEAD_IP": "10.0.0.1"}


# --- finding `aspkd ...` invocations in shell text ---------------------------------------

def _substitute_env(text: str) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: DUMMY_ENV.get(m.group(1), f"/tmp/dummy-{m.group(1).lower()}"), text)


def _segments(line: str) -> list[list[str]]:
    """Words of one shell line, split into simple commands at ; && || | &."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


_PREFIXES = ("then", "else", "do", "!", "{", "exec", "time")


def _is_aspkd(word: str) -> bool:
    return word == "aspkd" or word.endswith("/bin/aspkd")


def _command_words(words: list[str]) -> list[str]:
    """The words of the command a simple command runs: after shell keywords and VAR=value,
    or after `--` (`ray job submit ... -- CMD`); redirections dropped."""
    if "--" in words:
        words = words[words.index("--") + 1:]
    while words and (words[0] in _PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
        words = words[1:]
    for i, word in enumerate(words):
        if word.startswith((">", "<", "2>")):
            return words[:i]
    return words


def aspkd_invocations(text: str) -> list[list[str]]:
    """The argument lists of every `aspkd` (or .../bin/aspkd) command in shell text, looking
    inside `bash -c '...'` scripts; environment variables replaced by stand-in values."""
    found: list[list[str]] = []
    text = _substitute_env(text.replace("\\\n", " "))
    for line in text.splitlines():
        for segment in _segments(line):
            words = _command_words(segment)
            if len(words) >= 3 and os.path.basename(words[0]) in ("bash", "sh") \
                    and words[1] == "-c":
                found += aspkd_invocations(words[2])
            elif words and _is_aspkd(words[0]):
                found.append(words[1:])
    return found


def _yaml_commands(node) -> list[str]:
    """Shell commands in a manifest or launcher config: a RayJob's entrypoint, containers'
    command + args, and the launcher's *_commands lists."""
    out: list[str] = []
    if isinstance(node, dict):
        argv = [*(node.get("command") or []), *(node.get("args") or [])]
        if argv and all(isinstance(a, str) for a in argv):
            out.append(shlex.join(argv))
        for key, value in node.items():
            if key == "entrypoint" and isinstance(value, str):
                out.append(value)
            elif key.endswith("_commands") and isinstance(value, list):
                out += [c for c in value if isinstance(c, str)]
            else:
                out += _yaml_commands(value)
    elif isinstance(node, list):
        out += [c for v in node for c in _yaml_commands(v)]
    return out


def _code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M))


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            head, _, rest = line.strip().partition(" ")
            out.append((head.upper(), rest.strip()))
    return out


def recipe_commands() -> dict[str, list[list[str]]]:
    """Every aspkd invocation in cluster/, by file."""
    out: dict[str, list[list[str]]] = {}
    for name in (*MANIFESTS, "kuberay-settings.yaml", "ray-cluster.yaml"):
        docs = yaml.safe_load_all((CLUSTER / name).read_text())
        out[name] = [inv for d in docs for s in _yaml_commands(d) for inv in aspkd_invocations(s)]
    out["README.md"] = aspkd_invocations(_code_blocks((CLUSTER / "README.md").read_text()))
    out["local.sh"] = aspkd_invocations((CLUSTER / "local.sh").read_text())
    runs = [a for k, a in _dockerfile_instructions((CLUSTER / "Dockerfile").read_text())
            if k == "RUN"]
    out["Dockerfile"] = [inv for r in runs for inv in aspkd_invocations(r)]
    return out


# --- checking one invocation -----------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _pending_keys() -> tuple[str, ...]:
    """Config sections the recipes use before the schema has them (storage.root is being
    added to the schema); a key of a section the schema has is always validated."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return tuple(f"{s}." for s in ("storage",) if s not in fields)


def check_invocation(argv: list[str]) -> list[str]:
    """Problems with `aspkd <argv>`; [] when it parses and its values validate."""
    shown = "aspkd " + " ".join(argv)
    parser = build_parser()
    rest = list(argv)
    while rest and rest[0] in ("-q", "--quiet"):
        rest = rest[1:]
    if not rest or rest[0] in ("-h", "--help"):
        return [] if rest else [f"{shown}: no subcommand"]
    subs = _subparsers(parser)
    sub = rest[0]
    if sub not in subs:
        return [f"{shown}: no subcommand {sub!r}; there are {', '.join(sorted(subs))}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        parser.parse_args([sub, "--help"])
    if exc.value.code != 0 or "usage: aspkd " + sub not in out.getvalue():
        return [f"{shown}: `aspkd {sub} --help` failed"]
    # Exact option names: argparse would also accept unique prefixes (--out for --output-dir).
    known = set(subs[sub]._option_string_actions)
    bad = [w for w in rest[1:] if w.startswith("--") and w.split("=", 1)[0] not in known]
    if bad:
        return [f"{shown}: {sub} has no option {bad[0].split('=', 1)[0]}"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv)
    except SystemExit:
        return [f"{shown}: {err.getvalue().strip().splitlines()[-1]}"]
    return _check_values(shown, ns)


def _check_values(shown: str, ns: argparse.Namespace) -> list[str]:
    pending = _pending_keys()
    overrides = [o for o in getattr(ns, "overrides", []) if not o.startswith(pending)]
    try:
        if getattr(ns, "sweep", None):
            from aspkd_ray.sweep.tune import load_sweep

            load_sweep(resolve_config_path(ns.sweep, "--sweep"), overrides)
        elif hasattr(ns, "config"):
            data = {}
            if ns.config is not None:
                data = yaml.safe_load(resolve_config_path(ns.config).read_text()) or {}
            from_dict(data, overrides)
    except ConfigError as exc:
        return [f"{shown}: {exc}"]
    return []


# --- KubeRay manifests ------------------------------------------------------------------------

def _dockerfile_image() -> str:
    """The image name the Dockerfile's build command gives (`docker build ... -t NAME .`)."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.",
                  (CLUSTER / "Dockerfile").read_text())
    assert m, "cluster/Dockerfile: its header must show `docker build -f cluster/Dockerfile -t IMAGE .`"
    return m.group(1)


def _settings() -> dict[str, dict]:
    docs = yaml.safe_load_all((CLUSTER / "kuberay-settings.yaml").read_text())
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d and d["kind"] == "ConfigMap"}


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(label, pod spec) of the head and every worker group of a RayCluster or RayJob."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker group {g['groupName']}", g["template"]["spec"])
             for g in spec.get("workerGroupSpecs", [])]
    return pods


def check_pod(label: str, pod: dict, image: str, config_maps: dict[str, dict]) -> list[str]:
    problems = []
    container = pod["containers"][0]  # KubeRay's Ray container is the first
    if container.get("image") != image:
        problems.append(f"{label}: image {container.get('image')!r}, not {image!r} "
                        f"(cluster/Dockerfile)")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    shm = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
    if not shm or (volumes.get(shm[0]["name"], {}).get("emptyDir") or {}).get("medium") != "Memory":
        problems.append(f"{label}: no emptyDir with medium Memory mounted at /dev/shm")
    env = {e["name"]: e for e in container.get("env", [])}
    for name in REQUIRED_ENV:
        if name not in env:
            problems.append(f"{label}: no environment variable {name}")
            continue
        ref = (env[name].get("valueFrom") or {}).get("configMapKeyRef")
        if ref and ref.get("key") not in config_maps.get(ref.get("name"), {}):
            problems.append(f"{label}: {name} reads ConfigMap {ref.get('name')}/{ref.get('key')}, "
                            f"which cluster/kuberay-settings.yaml does not define")
        elif not ref and not env[name].get("value"):
            problems.append(f"{label}: {name} has no value")
    return problems


def check_entrypoint(entrypoint: str) -> list[str]:
    """KubeRay pastes the entrypoint into its submitter pod's shell: `$X`, `&&`, `;` must be
    inside one single-quoted `bash -c '...'` so they run on the head, with its environment."""
    if not re.search(r"[$;&|]", entrypoint):
        return []
    words = shlex.split(entrypoint)
    if len(words) == 3 and words[:2] == ["bash", "-c"] and entrypoint.startswith("bash -c '"):
        return []
    return [f"entrypoint {entrypoint[:60]!r}...: wrap it in bash -c '...' so $variables and "
            f"&& run on the Ray head, not in KubeRay's submitter pod"]


def check_manifest(text: str, image: str, config_maps: dict[str, dict]) -> list[str]:
    problems = []
    ray_pin = _ray_requirement()
    for doc in (d for d in yaml.safe_load_all(text) if d):
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        if Version(str(spec.get("rayVersion", "0"))) not in ray_pin.specifier:
            problems.append(f"rayVersion {spec.get('rayVersion')} is not {ray_pin}")
        for label, pod in pod_specs(doc):
            problems += check_pod(f"{doc['kind']} {label}", pod, image, config_maps)
        if doc["kind"] == "RayJob":
            problems += check_entrypoint(doc["spec"]["entrypoint"])
            if not any(inv[:1] == ["steal"] for inv in aspkd_invocations(doc["spec"]["entrypoint"])):
                problems.append("the RayJob runs no `aspkd steal`")
    return problems


# --- Dockerfile and packaging -------------------------------------------------------------------

def _ray_requirement() -> Requirement:
    return next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"])
                if r.name == "ray")


GPU_BASE = re.compile(r"rayproject/ray:(?P<version>\d+\.\d+\.\d+)(?:-py(?P<py>3)(?P<minor>\d+))?"
                      r"-(?:gpu|cu12\d*)")


def check_dockerfile(text: str) -> list[str]:
    problems = []
    steps = _dockerfile_instructions(text)
    froms = [a.split()[0] for k, a in steps if k == "FROM"]
    if len(froms) != 1:
        return [f"expected one FROM, found {len(froms)}"]
    m = GPU_BASE.fullmatch(froms[0])
    if not m:
        return [f"FROM {froms[0]}: not a Ray GPU image (rayproject/ray:X.Y.Z[-pyXY]-gpu or -cu12x)"]
    pin = _ray_requirement()
    if Version(m["version"]) not in pin.specifier:
        problems.append(f"FROM {froms[0]}: Ray {m['version']}, but pyproject.toml pins {pin}")
    if m["py"]:
        python = f"{m['py']}.{m['minor']}"
        if Version(python) not in SpecifierSet(PYPROJECT["project"]["requires-python"]):
            problems.append(f"FROM {froms[0]}: Python {python} outside requires-python")
    copied = " ".join(a for k, a in steps if k in ("COPY", "ADD"))
    for needed in ("pyproject.toml", "aspkd_ray", "tune_configs", "cluster/install-faiss-gpu.sh"):
        if not re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied):
            problems.append(f"the Dockerfile does not COPY {needed}")
    runs = [a for k, a in steps if k == "RUN"]
    if not any(re.search(r"pip install\b[^;&|]*\s\.(\s|$)", r) for r in runs):
        problems.append("no RUN pip install ... . (installing the copied repository)")
    if not any("install-faiss-gpu.sh" in r for r in runs):
        problems.append("faiss-cpu is not replaced by faiss-gpu (cluster/install-faiss-gpu.sh)")
    return problems


def check_faiss(pyproject: dict, script: str) -> list[str]:
    """faiss-cpu and faiss-gpu both install `faiss`: no install may bring both."""
    base = {Requirement(r).name for r in pyproject["project"]["dependencies"]}
    problems = [f"extra [{extra}] installs {Requirement(r).name} beside {base & {'faiss-cpu'}}"
                for extra, reqs in pyproject["project"].get("optional-dependencies", {}).items()
                for r in reqs if Requirement(r).name.startswith("faiss-gpu") and "faiss-cpu" in base]
    lines = script.splitlines()
    uninstall = [i for i, ln in enumerate(lines) if re.search(r"uninstall -y faiss-cpu", ln)]
    install = [i for i, ln in enumerate(lines) if re.search(r"\binstall\b.*\$SPEC|faiss-gpu==", ln)
               and "uninstall" not in ln and not ln.startswith(("#", "SPEC="))]
    if not uninstall or not install or uninstall[0] > install[0]:
        problems.append("install-faiss-gpu.sh must uninstall faiss-cpu before installing faiss-gpu")
    return problems


# --- the tests ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    # Commands' relative paths (tune_configs/...) are relative to the checkout, as with
    # `ray job submit --working-dir .` from the repository root.
    monkeypatch.chdir(REPO)


def test_launcher_config_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    image = config.get("docker", {}).get("image")
    if image:  # the same base as the Dockerfile: Ray's GPU image of the pinned version
        assert GPU_BASE.fullmatch(image), image
        assert Version(GPU_BASE.fullmatch(image)["version"]) in _ray_requirement().specifier
        assert any("install-faiss-gpu.sh" in c for c in config.get("setup_commands", []))


def test_launcher_schema_check_can_fail():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    config["available_node_types"]["head"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest(name):
    assert check_manifest((CLUSTER / name).read_text(), _dockerfile_image(), _settings()) == []


def test_settings_configmap_has_the_variables():
    data = _settings()["aspkd-settings"]
    assert set(REQUIRED_ENV) <= set(data)
    assert re.match(r"^(s3|gs|abfs)://|^/", data["ASPKD_STORAGE_ROOT"])
    assert data["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))


def test_manifest_checks_can_fail():
    image, maps = _dockerfile_image(), _settings()
    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    head["volumes"] = [v for v in head["volumes"] if v["name"] != "dshm"]
    worker["containers"][0]["env"] = [e for e in worker["containers"][0]["env"]
                                      if e["name"] != "MLFLOW_TRACKING_URI"]
    worker["containers"][0]["image"] = "rayproject/ray:2.60.0-gpu"
    doc["spec"]["rayClusterSpec"]["rayVersion"] = "2.40.0"
    doc["spec"]["entrypoint"] = "aspkd steal --set storage.root=$ASPKD_STORAGE_ROOT"
    problems = "\n".join(check_manifest(yaml.safe_dump(doc), image, maps))
    for expected in ("head: no emptyDir", "no environment variable MLFLOW_TRACKING_URI",
                     "image 'rayproject/ray:2.60.0-gpu'", "rayVersion 2.40.0",
                     "wrap it in bash -c"):
        assert expected in problems


def test_image_name_matches_readme_and_package_version():
    image = _dockerfile_image()
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    assert f"docker build -f cluster/Dockerfile -t {image} ." in (CLUSTER / "README.md").read_text()


def test_every_recipe_command_parses_and_validates():
    commands = recipe_commands()
    # The recipes the issue names must be there to be checked.
    assert any(c[:1] == ["train-teacher"] for c in commands["kuberay-rayjob.yaml"])
    assert any(c[:1] == ["steal"] for c in commands["kuberay-rayjob.yaml"])
    assert {"train-teacher", "steal", "sweep"} <= {c[0] for c in commands["README.md"] if c}
    problems = [f"{name}: {p}" for name, invs in commands.items()
                for inv in invs for p in check_invocation(inv)]
    assert problems == []


@pytest.mark.parametrize("argv, expected", [
    (["steel", "--config", "digits"], "no subcommand 'steel'"),
    (["steal", "--bogus", "1"], "has no option --bogus"),
    (["steal", "--out", "x"], "has no option --out"),
    (["steal", "--config", "no-such-config"], "no packaged config"),
    (["steal", "--set", "budget.calls=3"], "unknown key budget.calls"),
    (["steal", "--set", "aspkd.k=0"], "aspkd.k"),
    (["sweep", "--sweep", "nope.yaml"], "nope.yaml"),
    (["sweep"], "required"),
])
def test_command_checks_can_fail(argv, expected):
    problems = check_invocation(argv)
    assert problems and expected in problems[0], problems


def test_commands_are_found_inside_bash_c_and_ray_job_submit():
    text = ("ray job submit --working-dir . -- bash -c 'set -e; if [ -f x ]; then aspkd "
            "train-teacher --config digits; fi; aspkd steal --set storage.root=$ASPKD_STORAGE_ROOT'\n"
            "ray job submit -- .venv/bin/aspkd info  # a comment: aspkd nothing\n"
            "pip install aspkd-ray && aspkd nonexistent --help\n")
    found = aspkd_invocations(text)
    assert found == [["train-teacher", "--config", "digits"],
                     ["steal", "--set", "storage.root=s3://dummy-bucket/aspkd"],
                     ["info"], ["nonexistent", "--help"]]
    assert check_invocation(found[-1])  # a manifest naming a nonexistent subcommand fails


def test_readme_submits_with_ray_job_submit():
    readme = (CLUSTER / "README.md").read_text()
    assert "ray submit" not in readme  # `ray submit` runs `python aspkd`, not the command
    assert "ray job submit" in readme
    assert "--artifacts-destination" in readme and "storage.root" in readme


def test_dockerfile():
    assert check_dockerfile((CLUSTER / "Dockerfile").read_text()) == []


@pytest.mark.parametrize("line, expected", [
    ("FROM python:3.11-slim", "not a Ray GPU image"),
    ("FROM rayproject/ray:2.60.0-py311-cpu", "not a Ray GPU image"),
    ("FROM rayproject/ray:2.50.0-py311-gpu", "Ray 2.50.0"),
    ("FROM rayproject/ray:2.60.0-py38-gpu", "Python 3.8"),
])
def test_dockerfile_check_can_fail(line, expected):
    text = re.sub(r"^FROM .*$", line, (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    problems = check_dockerfile(text)
    assert problems and expected in problems[0], problems
    no_install = re.sub(r"pip install", "pip download", (CLUSTER / "Dockerfile").read_text())
    assert any("pip install" in p for p in check_dockerfile(no_install))


def test_dockerfile_copies_nothing_its_ignore_file_drops():
    ignored = {ln.strip() for ln in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    steps = _dockerfile_instructions((CLUSTER / "Dockerfile").read_text())
    for kind, args in steps:
        if kind == "COPY":
            for src in [w for w in args.split() if not w.startswith("--")][:-1]:
                assert src.split("/")[0] not in ignored, src
                assert (REPO / src).exists(), src


def test_faiss_cpu_and_gpu_are_never_installed_together():
    script = (CLUSTER / "install-faiss-gpu.sh").read_text()
    assert check_faiss(PYPROJECT, script) == []
    broken = json.loads(json.dumps(PYPROJECT))
    broken["project"]["optional-dependencies"]["gpu"] = ["faiss-gpu>=1.8"]
    assert check_faiss(broken, script)
    swapped = script.replace("uninstall -y faiss-cpu", "list")
    assert check_faiss(PYPROJECT, swapped)


# --- packaged configs ---------------------------------------------------------------------------

def test_pyproject_lists_every_package_and_config_folder():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {p.parent.relative_to(REPO).as_posix().replace("/", ".")
               for p in (REPO / "aspkd_ray").rglob("__init__.py")}
    on_disk |= {"aspkd_ray." + p.relative_to(REPO).as_posix().replace("/", ".")
                for p in [REPO / "tune_configs", *(REPO / "tune_configs").rglob("*")]
                if p.is_dir() and any(p.glob("*.yaml"))}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_packaged_config_names_resolve():
    names = packaged_config_names()
    assert {"digits", "digits-xdomain", "sweep-digits", "paper/cifar10-halfalexnet-sd2"} <= set(names)
    assert resolve_config_path("digits") == resolve_config_path("digits.yaml")
    assert resolve_config_path("paper/cifar10-halfalexnet-sd2").name == "cifar10-halfalexnet-sd2.yaml"
    # A file that exists wins over a packaged name.
    assert resolve_config_path("tune_configs/digits.yaml") == Path("tune_configs/digits.yaml")
    with pytest.raises(ConfigError, match="paper/cifar10-resnet18-sd2"):
        resolve_config_path("cifar10")
    with pytest.raises(ConfigError):  # a name stays inside the config folder
        resolve_config_path("../cluster/kuberay-settings")


def test_wheel_carries_the_configs(tmp_path):
    """`pip wheel .` (what the Dockerfile's `pip install .` builds) holds tune_configs/."""
    try:
        import setuptools

        isolated = Version(setuptools.__version__) < Version("68")
    except ImportError:
        isolated = True
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)]
    if not isolated:  # no index needed when the venv's setuptools will do
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=240)
    (wheel,) = tmp_path.glob("aspkd_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in packaged_config_names():
        assert f"aspkd_ray/tune_configs/{config}.yaml" in names
    assert "aspkd_ray/config/packaged.py" in names
    assert not any(n.startswith("tune_configs/") for n in names)  # not a top-level package
