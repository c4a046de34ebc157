"""The Helm chart in charts/lorax: `helm lint` and `helm template` of the default values and of each
example values file, with the rendered manifests checked against what the launcher and the router
actually do (their port, `/health`, their shutdown timing, every launcher flag's variable)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "lorax"
HELM = REPO / ".tools" / "bin" / "helm"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
LAUNCHER_DOC = REPO / "docs" / "reference" / "launcher.md"

Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail(f"helm is missing at {HELM}: build it with `make .tools/bin/helm`")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


def values_args(tmp_path: Path, files: list[Path], values: dict[str, Any] | None) -> list[str]:
    args = [arg for f in files for arg in ("-f", str(f))]
    if values is not None:
        extra = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
        extra.write_text(yaml.safe_dump(values))
        args += ["-f", str(extra)]
    return args


def render(tmp_path: Path, *files: Path, values: dict[str, Any] | None = None) -> list[Manifest]:
    result = helm("template", "test", str(CHART), *values_args(tmp_path, list(files), values))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(tmp_path: Path, values: dict[str, Any]) -> str:
    result = helm("template", "test", str(CHART), *values_args(tmp_path, [], values))
    assert result.returncode != 0, f"rendering should have failed:\n{result.stdout}"
    return result.stderr


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def container(manifests: list[Manifest]) -> dict[str, Any]:
    (deployment,) = by_kind(manifests, "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    return server


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    (deployment,) = by_kind(manifests, "Deployment")
    return deployment["spec"]["template"]["spec"]


def env(manifests: list[Manifest]) -> dict[str, Any]:
    """Name to `value` (or `valueFrom`) of the container's variables; the last of a name wins, as
    in Kubernetes."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifests)["env"]}


def flag_env_names() -> list[str]:
    """The variable of every launcher flag, from the generated reference page."""
    names = re.findall(r"^Environment: `([A-Z_]+)`", LAUNCHER_DOC.read_text(), re.MULTILINE)
    assert len(names) > 30, "the launcher reference lists no flags: has its format changed?"
    return names


def camel(env_name: str) -> str:
    first, *rest = env_name.lower().split("_")
    return first + "".join(part.capitalize() for part in rest)


def launcher_stop_seconds() -> int:
    """Worst case of the launcher's stop: the router, then the shards, each SIGKILLed
    SHUTDOWN_GRACE after SIGTERM."""
    source = (REPO / "launcher" / "src" / "launch.rs").read_text()
    grace = re.search(r"SHUTDOWN_GRACE: Duration = Duration::from_secs\((\d+)\)", source)
    assert grace, "SHUTDOWN_GRACE not found in launcher/src/launch.rs"
    return 2 * int(grace.group(1))


def launcher_default(field: str) -> str:
    source = (REPO / "launcher" / "src" / "args.rs").read_text()
    found = re.search(rf"default_value_t = ([\w.]+)\)\]\s*pub {field}:", source)
    assert found, f"no default for {field} in launcher/src/args.rs"
    return found.group(1)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render(tmp_path_factory.mktemp("default"))


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda e: e.name if e else "default")
def test_lint(example: Path | None) -> None:
    files = ["-f", str(example)] if example else []
    result = helm("lint", "--strict", str(CHART), *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_examples_exist() -> None:
    assert {e.name for e in EXAMPLES} >= {"multi-gpu.yaml", "quantized.yaml", "s3-adapters.yaml"}


def test_default_objects(default: list[Manifest]) -> None:
    assert sorted(m["kind"] for m in default) == ["Deployment", "Service", "ServiceAccount"]
    (deployment,) = by_kind(default, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert pod_spec(default)["serviceAccountName"] == by_kind(default, "ServiceAccount")[0]["metadata"]["name"]


def test_ports(default: list[Manifest], tmp_path: Path) -> None:
    # The image's launcher listens on PORT; the chart sets it to the container port it declares.
    (port,) = container(default)["ports"]
    assert port == {"name": "http", "containerPort": 80, "protocol": "TCP"}
    assert env(default)["PORT"] == "80"
    (service,) = by_kind(default, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 80 and service_port["targetPort"] == "http"
    assert service["spec"]["selector"] == by_kind(default, "Deployment")[0]["spec"]["selector"]["matchLabels"]

    moved = render(tmp_path, values={"containerPort": 8080, "service": {"port": 9000}})
    assert container(moved)["ports"][0]["containerPort"] == 8080
    assert env(moved)["PORT"] == "8080"
    assert by_kind(moved, "Service")[0]["spec"]["ports"][0]["port"] == 9000


def test_probes(default: list[Manifest]) -> None:
    server = container(default)
    readiness = server["readinessProbe"]
    assert readiness["httpGet"] == {"path": "/health", "port": "http"}
    # /health may wait up to the stall bound for a probe generation queued behind a running step;
    # a shorter timeout would take a pod that is merely busy out of the Service.
    assert readiness["timeoutSeconds"] > float(launcher_default("health_stall_timeout_s"))
    # /health fails while one step runs longer than the stall bound: liveness must not depend on
    # it, or a long prefill would get the pod restarted.
    liveness = server["livenessProbe"]
    assert liveness["tcpSocket"] == {"port": "http"} and "httpGet" not in liveness
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, (
        "a few missed checks must not restart the pod"
    )
    # The router opens its port only once the shards have loaded the model: the startup probe
    # must wait at least as long as the launcher waits for the shards.
    startup = server["startupProbe"]
    assert startup["tcpSocket"] == {"port": "http"}
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert window >= int(launcher_default("shard_startup_timeout_s"))


def test_termination_outlasts_the_launchers_stop(default: list[Manifest], tmp_path: Path) -> None:
    pod = pod_spec(default)
    pre_stop = container(default)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + launcher_stop_seconds()
    error = render_error(tmp_path, {"terminationGracePeriodSeconds": 20})
    assert "terminationGracePeriodSeconds (20) must exceed" in error


def test_environment(default: list[Manifest], tmp_path: Path) -> None:
    variables = env(default)
    assert variables["MODEL_ID"] == "mistralai/Mistral-7B-Instruct-v0.1"
    assert variables["HUGGINGFACE_HUB_CACHE"] == "/data"
    assert variables["JSON_OUTPUT"] == "true"
    assert "HUGGING_FACE_HUB_TOKEN" not in variables
    # Null values are not passed: the launcher's own defaults apply.
    assert "NUM_SHARD" not in variables and "QUANTIZE" not in variables
    assert pod_spec(default)["enableServiceLinks"] is False

    tokened = render(tmp_path, values={"hfToken": {"existingSecret": "hf", "key": "tok"}})
    assert env(tokened)["HUGGING_FACE_HUB_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}


def test_value_formatting(tmp_path: Path) -> None:
    manifests = render(
        tmp_path,
        values={
            "lorax": {
                "maxBatchTotalTokens": 1000000,
                "adapterMemoryFraction": 0.25,
                "trustRemoteCode": False,
                "corsAllowOrigin": ["https://a.example", "https://b.example"],
            },
            "launcherEnv": {"RUST_LOG": "debug", "MAX_BEST_OF": 4},
            "extraEnv": [{"name": "MAX_BEST_OF", "value": "5"}],
            "extraArgs": ["--max-stop-sequences", "6"],
        },
    )
    variables = env(manifests)
    # Helm reads numbers as floats; a large one must not reach the launcher as 1e+06.
    assert variables["MAX_BATCH_TOTAL_TOKENS"] == "1000000"
    assert variables["ADAPTER_MEMORY_FRACTION"] == "0.25"
    assert variables["TRUST_REMOTE_CODE"] == "false"
    assert variables["CORS_ALLOW_ORIGIN"] == "https://a.example,https://b.example"
    assert variables["RUST_LOG"] == "debug"
    assert variables["MAX_BEST_OF"] == "5", "extraEnv comes last and wins"
    assert container(manifests)["args"] == ["--max-stop-sequences", "6"]


def test_every_launcher_flag_is_reachable(tmp_path: Path) -> None:
    chart_managed = {"PORT": ("containerPort", 8081), "HUGGINGFACE_HUB_CACHE": ("cache", {"mountPath": "/cache"})}
    names = flag_env_names()
    lorax = {camel(name): f"value-of-{name}" for name in names if name not in chart_managed}
    values: dict[str, Any] = {"lorax": lorax, "gpu": {"count": 0}}
    values.update(dict(chart_managed.values()))
    variables = env(render(tmp_path, values=values))
    for name in names:
        if name in chart_managed:
            continue
        assert variables.get(name) == f"value-of-{name}", f"lorax.{camel(name)} did not reach {name}"
    assert variables["PORT"] == "8081"
    assert variables["HUGGINGFACE_HUB_CACHE"] == "/cache"
    assert {"mountPath": "/cache", "name": "cache"} in container(render(tmp_path, values=values))["volumeMounts"]


def test_wrong_keys_fail(tmp_path: Path) -> None:
    assert "lorax.maxBatchTokens is not a launcher flag" in render_error(tmp_path, {"lorax": {"maxBatchTokens": 1}})
    assert "set containerPort instead" in render_error(tmp_path, {"lorax": {"port": 8080}})
    assert "lorax.modelId is required" in render_error(tmp_path, {"lorax": {"modelId": ""}})
    error = render_error(tmp_path, {"lorax": {"numShard": 4}, "gpu": {"count": 2}})
    assert "numShard is 4 but gpu.count is 2" in error


def test_volumes(default: list[Manifest]) -> None:
    mounts = {m["mountPath"]: m["name"] for m in container(default)["volumeMounts"]}
    assert mounts == {"/data": "cache", "/dev/shm": "shm"}
    volumes = {v["name"]: v for v in pod_spec(default)["volumes"]}
    assert volumes["cache"]["emptyDir"] == {}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"


def test_gpu_resources(default: list[Manifest], tmp_path: Path) -> None:
    assert container(default)["resources"]["limits"] == {"nvidia.com/gpu": 1}
    cpu_only = render(tmp_path, values={"gpu": {"count": 0}})
    assert "resources" not in container(cpu_only)


def test_multi_gpu_example(tmp_path: Path) -> None:
    manifests = render(tmp_path, CHART / "examples" / "multi-gpu.yaml")
    server = container(manifests)
    assert env(manifests)["NUM_SHARD"] == "2"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert server["resources"]["limits"]["memory"] == "96Gi", "the example's own limits are kept"
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in server["volumeMounts"]
    (claim,) = by_kind(manifests, "PersistentVolumeClaim")
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert pod_spec(manifests)["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert env(manifests)["HUGGING_FACE_HUB_TOKEN"]["secretKeyRef"]["name"] == "hf-token"


def test_quantized_example(tmp_path: Path) -> None:
    method = env(render(tmp_path, CHART / "examples" / "quantized.yaml"))["QUANTIZE"]
    values = re.search(r"### `--quantize <QUANTIZE>`.*?^Values: (.*?)\.$", LAUNCHER_DOC.read_text(), re.S | re.M)
    assert values, "the --quantize values are missing from the launcher reference"
    assert f"`{method}`" in values.group(1)


def test_s3_example(tmp_path: Path) -> None:
    variables = env(render(tmp_path, CHART / "examples" / "s3-adapters.yaml"))
    assert variables["ADAPTER_SOURCE"] == "s3"
    assert variables["ADAPTER_ID"].startswith("s3://")
    # The shards' S3 client (boto3) takes the standard AWS variables.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert variables[name]["secretKeyRef"]["name"] == "s3-adapters"
    sources = (REPO / "server" / "lorax_server" / "adapters" / "sources.py").read_text()
    assert "boto3" in sources and "AWS_ACCESS_KEY_ID" in sources


def test_optional_objects(default: list[Manifest], tmp_path: Path) -> None:
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PersistentVolumeClaim"):
        assert not by_kind(default, kind)
    queue_metric = {
        "type": "Pods",
        "pods": {"metric": {"name": "lorax_queue_size"}, "target": {"type": "AverageValue", "averageValue": "4"}},
    }
    manifests = render(
        tmp_path,
        values={
            "autoscaling": {"enabled": True, "maxReplicas": 3, "metrics": [queue_metric]},
            "podDisruptionBudget": {"enabled": True},
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        },
    )
    (deployment,) = by_kind(manifests, "Deployment")
    name = deployment["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (hpa,) = by_kind(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["maxReplicas"] == 3 and hpa["spec"]["metrics"] == [queue_metric]
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    (monitor,) = by_kind(manifests, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    no_metric = render_error(tmp_path, {"autoscaling": {"enabled": True}})
    assert "autoscaling.enabled needs autoscaling.metrics" in no_metric


def test_readme_documents_every_value() -> None:
    def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
        """Dotted paths of the values; a probe is documented as one object."""
        paths = []
        for key, value in tree.items():
            path = f"{prefix}{key}"
            opaque = not isinstance(value, dict) or not value or key.endswith("Probe")
            paths += [path] if opaque else leaves(value, f"{path}.")
        return paths

    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [path for path in leaves(values) if f"| `{path}` |" not in readme]
    assert not missing, f"values missing from the README's table: {missing}"
