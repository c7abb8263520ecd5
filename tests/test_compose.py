"""docker-compose.yml, Dockerfile and .dockerignore, checked without Docker.

The compose file is interpolated as Compose does (`${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$`), validated
against the Compose Specification's JSON schema (vendored: tests/compose-spec.README.md), its commands are parsed by
the real command-line parsers (tilerec's, celery's click commands, Flower's tornado options), its environment is
compared with what the code reads, and its Redis command line and health checks are run against real processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import redis
import tomllib
import yaml
from celery import Celery
from packaging.specifiers import SpecifierSet

from tasks.cli.clusters import worker_command
from tasks.local import Worker, _die_with_parent, _stop, _wait, find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
SECRETS = {"REDIS_PASSWORD": "pw-4f9c1e0b7a2d", "FLOWER_BASIC_AUTH": "admin:flower-pw"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


class MissingVariable(ValueError):
    """A `${VAR:?message}` or `${VAR?message}` whose variable is unset (or empty, for `:?`)."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation of one string value (nested defaults included)."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, end = 0, i + 1
            for end in range(i + 1, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    break
            else:
                raise ValueError(f"unclosed ${{ in {text!r}")
            out.append(_substitute(text[i + 2 : end], env))
            i = end + 1
        else:
            name = re.match(r"[A-Za-z_]\w*", text[i + 1 :])
            if not name:
                raise ValueError(f"invalid interpolation format in {text!r}")
            out.append(env.get(name.group(), ""))
            i += 1 + name.end()
    return "".join(out)


def _substitute(body: str, env: Mapping[str, str]) -> str:
    name, operator, argument = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?[-?+])(.*))?", body, re.S).groups()
    value = env.get(name)
    present = bool(value) if operator and operator.startswith(":") else value is not None
    if operator in (":-", "-"):
        return value if present else interpolate(argument, env)
    if operator in (":?", "?"):
        if not present:
            raise MissingVariable(f"{name}: {argument}")
        return value
    if operator in (":+", "+"):
        return interpolate(argument, env) if present else ""
    return value or ""


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def compose(env: Mapping[str, str] = SECRETS) -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with exactly these variables set."""
    return interpolated(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def celery_context(argv: list[str]) -> click.Context:
    """`celery ARGV` parsed by celery's own click commands (flower comes in as celery's plugin), run no further."""
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    parent = celery.make_context("celery", list(argv))
    parent.obj = CLIContext(app=find_app(parent.params["app"]), no_color=True, workdir=None, quiet=True)
    protected = getattr(parent, "_protected_args", None) or getattr(parent, "protected_args", [])  # click 8.2+ / 8.1
    name, command, rest = celery.resolve_command(parent, [*protected, *parent.args])
    return command.make_context(name, rest, parent=parent)


def tilerec_worker(argv: list[str]) -> click.Context:
    """`tilerec worker ARGS` as tasks.cli.clusters turns it into `celery -A tasks worker ARGS`, then celery's parse."""
    assert argv[:2] == ["tilerec", "worker"], argv
    assert "tilerec" in PYPROJECT["project"]["scripts"]
    command, _ = worker_command(argv[2:])
    assert command[1:6] == ["-m", "celery", "-A", "tasks", "worker"], command
    context = celery_context(command[3:])
    assert context.info_name == "worker"
    return context


def test_the_compose_file_fits_the_compose_specification():
    validator = jsonschema.Draft7Validator(SCHEMA)
    document = compose()
    errors = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)
    ]
    assert errors == []
    broken = copy.deepcopy(document)
    broken["services"]["worker"]["healthcheck"]["intervall"] = "30s"  # the schema has teeth
    assert [error.message for error in validator.iter_errors(broken)]


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_the_compose_file_refuses_to_run_without_its_secrets(secret):
    for env in ({k: v for k, v in SECRETS.items() if k != secret}, {**SECRETS, secret: ""}):
        with pytest.raises(MissingVariable, match=secret):
            compose(env)


def test_redis_workers_and_flower_as_a_deployment_needs_them():
    services = compose()["services"]
    assert set(services) == {"redis", "worker", "flower", "gpu-worker"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service["restart"] == "unless-stopped", name

    redis_service = services["redis"]
    image, _, tag = redis_service["image"].partition(":")
    assert image == "redis" and int(re.match(r"\d+", tag).group()) >= 7, "a current official Redis image"
    assert redis_service["command"][0] == "redis-server"
    options = dict(zip(redis_service["command"][1::2], redis_service["command"][2::2], strict=True))
    assert options["--requirepass"] == SECRETS["REDIS_PASSWORD"]
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert "redis-data:/data" in redis_service["volumes"]
    assert "redis-data" in compose()["volumes"]

    worker, flower = services["worker"], services["flower"]
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` needs neither"
    assert worker["build"]["context"] == "." and flower["image"] == worker["image"]
    for service in (worker, flower):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["TILEREC_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    mounts = {mount["target"]: mount for mount in worker["volumes"]}
    images = mounts[worker["environment"]["TILEREC_ALLOWED_ROOTS"]]
    assert images["type"] == "bind" and images["read_only"] is True, "the shared image folder is the allowed root"
    assert mounts[worker["environment"]["TILEREC_MODEL_DIR"]]["read_only"] is True

    assert flower["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    assert not any("auth" in argument for argument in flower["command"]), "no credentials on a command line"
    for service in (redis_service, flower):  # published on loopback unless the operator says otherwise
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])


def test_the_worker_command_is_one_tilerec_and_celery_accept():
    worker = compose()["services"]["worker"]
    params = tilerec_worker(worker["command"]).params
    assert params["queues"] == ["tilerec", "tilerec.tiles", "celery"]
    assert params["concurrency"] == "auto" or params["concurrency"] >= 1  # tilerec worker resolves auto itself
    assert params["hostname"] == f"worker@{socket.gethostname()}"

    renamed = {**SECRETS, "TILEREC_JOBS_QUEUE": "acme.jobs", "TILEREC_TILES_QUEUE": "acme.gpu"}
    worker = compose(renamed)["services"]["worker"]
    assert tilerec_worker(worker["command"]).params["queues"] == ["acme.jobs", "acme.gpu", "celery"]
    assert worker["environment"]["TILEREC_TILES_QUEUE"] == "acme.gpu"
    recognition_only = compose({**renamed, "WORKER_QUEUES": "acme.gpu", "WORKER_CONCURRENCY": "1"})
    params = tilerec_worker(recognition_only["services"]["worker"]["command"]).params
    assert (params["queues"], params["concurrency"]) == (["acme.gpu"], 1)

    with pytest.raises(click.UsageError):  # the parser has teeth
        tilerec_worker(["tilerec", "worker", "--queue-typo", "x"])

    kind, check = worker["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    argv = [word for word in shlex.split(check) if not word.startswith(">")]
    assert argv[0] == "celery"
    ping = celery_context(argv[1:])
    assert (ping.info_name, ping.params["command"]) == ("inspect", "ping")
    assert ping.params["destination"] == ["worker@$HOSTNAME"], "the name the worker was given (worker@%h)"


def test_the_dockerfile_default_command_is_a_worker():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()]
    instructions = [line.split(maxsplit=1) for line in lines if line and not line.startswith("#")]
    args = dict(value.split("=", 1) for word, value in instructions if word == "ARG")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(args["PYTHON_VERSION"])
    assert [value for word, value in instructions if word == "FROM"] == ["python:${PYTHON_VERSION}-slim"]
    runs = " ".join(value for word, value in instructions if word == "RUN")
    assert 'pip install "/src[${EXTRAS}]"' in runs
    extras = compose()["services"]["worker"]["build"]["args"]["EXTRAS"]
    assert extras == args["EXTRAS"] == "monitor"
    assert any(dep.startswith("flower") for dep in PYPROJECT["project"]["optional-dependencies"]["monitor"])
    [user] = [value for word, value in instructions if word == "USER"]
    assert user not in ("root", "0")
    [cmd] = [value for word, value in instructions if word == "CMD"]
    assert tilerec_worker(json.loads(cmd)).params["queues"] is None  # both queues, from celeryconfig


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_the_build_context_holds_the_package_and_no_secrets():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in patterns if line and not line.startswith("#")]
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = ["pyproject.toml", *(f"{m}.py" for m in setuptools["py-modules"]), *setuptools["packages"]]
    for path in needed:
        module = path.replace(".", "/") + "/__init__.py" if not path.endswith((".py", ".toml")) else path
        assert (ROOT / module).exists() and not _ignored(module, patterns), module
    for path in (".env", ".git/config", ".venv/bin/python", "images/big.png", "tasks/__pycache__/x.pyc", "tests/x"):
        assert _ignored(path, patterns), path


def test_every_setting_can_come_from_the_environment_and_nothing_else_is_set(monkeypatch):
    config_source = (ROOT / "celeryconfig.py").read_text()
    read_by_config = set(re.findall(r'_(?:env|flag|number)\(\s*"(TILEREC_\w+)"', config_source))
    assert {"TILEREC_BROKER_URL", "TILEREC_TASK_EVENTS", "TILEREC_TILE_TTL"} <= read_by_config  # _env, _flag, _number
    sources = [ROOT / "celeryconfig.py", *(ROOT / "pipeline").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
    read_by_code = {name for path in sources for name in re.findall(r'"(TILEREC_\w+)"', path.read_text())}
    services = compose()["services"]
    for name in ("worker", "flower"):
        set_here = {variable for variable in services[name]["environment"] if variable.startswith("TILEREC_")}
        assert set_here <= read_by_code, f"{name} sets variables no code reads: {set_here - read_by_code}"
    assert read_by_config <= set(services["worker"]["environment"]), "each celeryconfig setting reachable from .env"
    flower_options = {v for v in services["flower"]["environment"] if v.startswith("FLOWER_")}
    assert flower_options == {"FLOWER_BASIC_AUTH", "FLOWER_READ_ONLY", "FLOWER_TASKS_COLUMNS"}

    for variable in [v for v in os.environ if v.startswith("TILEREC_")]:
        monkeypatch.delenv(variable)
    defaults = runpy.run_path(str(ROOT / "celeryconfig.py"))
    for variable, value in services["worker"]["environment"].items():
        monkeypatch.setenv(variable, value)
    settings = runpy.run_path(str(ROOT / "celeryconfig.py"))
    url = f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert settings["broker_url"] == settings["tilerec_store_url"] == url
    assert settings["result_backend"] == f"tasks.chords:RedisBackend+{url}"  # Celery's, with chords made crash-safe
    assert settings["tilerec_allowed_roots"] == "/data"
    assert settings["task_routes"]["tilerec.recognize_tiles"] == {"queue": "tilerec.tiles"}
    assert settings["task_routes"]["tilerec.merge"] == {"queue": "tilerec", "priority": 0}
    for name in ("tilerec_tile_ttl", "tilerec_max_pixels", "result_expires", "visibility_timeout"):
        assert settings[name] == defaults[name], f"an empty {name} means celeryconfig's default"


@pytest.fixture
def flower_options() -> Iterator[Any]:
    """Flower's own option parser (tornado's global options, which importing flower defines); restored after."""
    from flower import command  # noqa: F401  (defines the options)
    from tornado.options import options

    saved = {name: option.value() for name, option in options._options.items()}
    try:
        yield options
    finally:
        for name, value in saved.items():
            options._options[name].set(value)


def test_the_flower_command_and_options_are_ones_flower_accepts(flower_options, monkeypatch):
    from flower.command import apply_env_options
    from tornado.options import Error

    flower = compose()["services"]["flower"]
    assert flower["command"][0] == "celery"
    context = celery_context(flower["command"][1:])
    assert context.info_name == "flower"
    flower_options.parse_command_line(["flower", *context.params["tornado_argv"]], final=False)
    for variable, value in flower["environment"].items():
        monkeypatch.setenv(variable, value)
    apply_env_options()
    assert flower_options.basic_auth == [SECRETS["FLOWER_BASIC_AUTH"]]
    assert flower_options.read_only is True
    assert flower_options.tasks_columns.split(",")[3:6] == ["args", "kwargs", "result"]  # a job's progress shows
    assert flower_options.address == "0.0.0.0"
    assert [f":{flower_options.port}" in port for port in flower["ports"]] == [True]
    assert f"127.0.0.1:{flower_options.port}/healthcheck" in " ".join(flower["healthcheck"]["test"])
    with pytest.raises(Error):
        flower_options.parse_command_line(["flower", "--basic_auht=x:y"], final=False)


@pytest.mark.cluster
def test_the_worker_health_check_answers_for_a_live_worker_only(redis_server, tmp_path):
    """The compose health check, run as is by sh against a real worker named as compose names it (worker@%h)."""
    [_, check] = compose()["services"]["worker"]["healthcheck"]["test"]
    hostname = socket.gethostname()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `celery` as on the image's PATH
    env = {**os.environ, "PATH": path, "TILEREC_BROKER_URL": redis_server.url, "HOSTNAME": hostname}
    # its own queue, so it takes none of the session's tasks
    with Worker(redis_server.url, 1, ["tilerec.health-probe"], name="worker", log_file=str(tmp_path / "w.log")):
        live = subprocess.Popen(["sh", "-c", check], env=env)
        # no such worker: fails (after its timeout, shortened here)
        quick = check.replace("--timeout 5", "--timeout 1")
        gone = subprocess.Popen(["sh", "-c", quick], env={**env, "HOSTNAME": "gone"}, stderr=subprocess.DEVNULL)
        assert (live.wait(60), gone.wait(60) != 0) == (0, True)


@contextlib.contextmanager
def compose_redis(arguments: list[str], port: int, folder: Path) -> Iterator[subprocess.Popen]:
    """redis-server with the compose file's arguments, on a loopback port and a folder of ours."""
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [find_redis_server(), *arguments, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        yield process
    finally:
        _stop(process, 5)


def _crash_with_a_queued_job(arguments: list[str], password: str, folder: Path) -> int:
    """Queue one tilerec job (no worker listens), SIGKILL Redis, start it again: how many jobs are queued?"""
    port = free_port()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return bool(client.ping())
        return False

    with compose_redis(arguments, port, folder) as process:
        _wait(answers, 10, "redis-server", process)
        sender = Celery("caller", broker=url, set_as_current=False)
        sender.send_task("tilerec.recognize", args=["/data/big.png", "faces"], queue="tilerec")
        sender.close()
        assert client.llen("tilerec") == 1
        # appendfsync everysec: Redis may postpone writing the AOF by up to 2 s while a background fsync runs
        # (seen once in a full test run: the job was lost), so the promise is: queued over 2 s before a crash, kept
        time.sleep(2.2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    with compose_redis(arguments, port, folder) as process:
        _wait(answers, 10, "redis-server", process)
        queued = client.lrange("tilerec", 0, -1)
    client.close()
    assert all(json.loads(message)["headers"]["task"] == "tilerec.recognize" for message in queued)
    return len(queued)


@pytest.mark.cluster
def test_compose_redis_keeps_queued_jobs_through_a_crash_and_its_health_check_needs_the_password(tmp_path):
    redis_service = compose()["services"]["redis"]
    arguments = redis_service["command"][1:]
    assert _crash_with_a_queued_job(arguments, SECRETS["REDIS_PASSWORD"], tmp_path / "aof") == 1
    at = arguments.index("--appendonly") + 1
    without_aof = [*arguments[:at], "no", *arguments[at + 1 :]]
    assert _crash_with_a_queued_job(without_aof, SECRETS["REDIS_PASSWORD"], tmp_path / "plain") == 0  # teeth

    redis_cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
    port = free_port()
    [kind, check] = redis_service["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and check.startswith("redis-cli ")
    check = check.replace("redis-cli", f"{shlex.quote(redis_cli)} -p {port}", 1)
    with compose_redis(arguments, port, tmp_path / "health") as process:
        env = {**os.environ, **redis_service["environment"]}
        _wait(lambda: subprocess.run(["sh", "-c", check], env=env).returncode == 0, 10, "redis health", process)
        wrong = {**env, "REDISCLI_AUTH": "not-the-password"}
        assert subprocess.run(["sh", "-c", check], env=wrong, capture_output=True).returncode != 0


def test_a_real_docker_compose_accepts_the_file_when_there_is_one(tmp_path):
    """Docker is not on the test machines; where a Docker Compose v2 is, it must accept the file too."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **SECRETS}
    candidates = [["docker", "compose"], ["docker-compose"]]
    found = [
        c
        for c in candidates
        if shutil.which(c[0]) and subprocess.run([*c, "version"], capture_output=True).returncode == 0
    ]
    if not found:
        pytest.skip("no Docker Compose v2 here")
    done = subprocess.run([*found[0], "-f", str(COMPOSE_FILE), "config", "--quiet"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
