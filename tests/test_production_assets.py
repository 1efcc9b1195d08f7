"""deploy/: the dashboards, alert rules, images, compose file and Kubernetes manifests.

Offline and without Docker: the metric names the dashboards and alert rules query are
scraped from the real coordinator's and endpoint's ``/metrics``; the manifests validate
against the Kubernetes schemas (kubernetes-validate) and the Compose specification (the
schema check-jsonschema ships); every command they run is parsed by the real ``fedlearn``
CLI; and the entrypoints run as plain processes on loopback with the manifests' own
arguments and configs, their container paths mapped into a temporary directory: the
compose demo's enrollment step, the coordinator accepting a site, the endpoint answering
its OIP health routes over TLS.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import click
import httpx
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from clients.tabular import build_model
from deployment import free_port
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.cli.main import app
from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.loading import load_toml
from fedlearn.deploy.launch import build_site
from fedlearn.registry.model_registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DOCKERFILES = {p.name.removesuffix(".Dockerfile"): p for p in (DEPLOY / "docker").glob("*")}
K8S = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
FEDLEARN = Path(sys.executable).parent / "fedlearn"
#: what Prometheus itself records for every scrape target (no code exports it)
PROMETHEUS_OWN = {"up"}
#: the images' working directory, where their clients/ package lies (the repository here)
WORKDIR = "/app"


# ------------------------------------------------------------------------------ helpers


def cli_command(args: list[str]) -> click.Command:
    """Parse ``fedlearn ARGS`` with the real CLI (subcommands, options, required values);
    returns the command they name. Raises click's usage errors."""
    command: click.Command = typer.main.get_command(app)
    names = ["fedlearn"]
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"fedlearn {' '.join(args)}: no subcommand"
        name, *rest = rest
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"fedlearn {' '.join(args)}: no subcommand {name!r}"
        command, names = sub, [*names, name]
    with command.make_context(" ".join(names), rest):
        pass
    return command


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, each as its words."""
    out = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "(", ")"):
                if words:
                    out.append(words)
                words = []
            else:
                words.append(token)
    return out


def fedlearn_calls(script: str) -> list[list[str]]:
    """The arguments of each ``fedlearn`` call in a shell script."""
    return [words[1:] for words in shell_commands(script) if words[0] == "fedlearn"]


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects (Grafana's ``$__`` intervals as 5m)."""
    parsed = promql_parser.parse(re.sub(r"\$__\w+", "5m", expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(parsed, visit)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (also inside collapsed rows)
    and ``label_values(metric, label)`` variable queries."""
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", text)
            assert match, f"variable {variable['name']}: {text!r}"
            exprs.append(match[1])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def sample_names(exposition: str) -> dict[str, str]:
    """Every sample name a ``/metrics`` exposition can carry, with its family's name:
    ``_total`` (and ``_created``) of a counter, ``_bucket``, ``_sum``, ``_count`` of a
    histogram, a gauge's own name (not the ``_created`` time series). From the HELP/TYPE
    lines, so a labelled family with no series yet counts too."""
    names: dict[str, str] = {}
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "gauge": ("",),
    }
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):  # each series' creation time, not a metric
            continue
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def unknown_metrics(used: set[str], exported: dict[str, str]) -> set[str]:
    return {name for name in used if name not in exported and name not in PROMETHEUS_OWN}


def map_paths(text: str, root: Path) -> str:
    """A config's absolute paths moved under ``root``."""
    return re.sub(r'"(/[^"]*)"', lambda m: f'"{root}{m[1]}"', text)


def map_args(args: list[str], root: Path, ports: dict[str, int]) -> list[str]:
    """A command's container paths under ``root`` (the working directory: the
    repository), its listen address loopback and its ports ``ports[option]``."""
    out = []
    for i, arg in enumerate(args):
        option = args[i - 1] if i else ""
        if option in ports:
            out.append(str(ports[option]))
        elif option == "--host":
            out.append("127.0.0.1")
        elif arg == WORKDIR:
            out.append(str(ROOT))
        elif arg.startswith("/"):
            out.append(f"{root}{arg}")
        else:
            out.append(arg)
    return out


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the config once: update the test"
    return text.replace(old, new)


def spawn(args: list[str], processes: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(FEDLEARN), *args],
        cwd=ROOT,  # the image's WORKDIR, with clients/
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    processes.append(proc)
    return proc


def output(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=10)[0]


def wait_until(check: Any, proc: subprocess.Popen[str], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what}: exited {proc.returncode}\n{output(proc)}"
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s\n{output(proc)}")


def scrape(url: str, **kwargs: Any) -> str:
    response = httpx.get(url, timeout=5, **kwargs)
    response.raise_for_status()
    return response.text


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def image_command(path: Path) -> list[str]:
    """ENTRYPOINT + CMD of a Dockerfile (exec form only)."""
    parts = dict(dockerfile(path))
    return [*json.loads(parts["ENTRYPOINT"]), *json.loads(parts["CMD"])]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, doc) for p in K8S for doc in yaml.safe_load_all(p.read_text()) if doc]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) of every Deployment and StatefulSet."""
    for _, doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                yield doc, pod, container


def config_maps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for _, d in k8s_docs() if d["kind"] == "ConfigMap"}


def toml_paths(text: str) -> list[str]:
    """The absolute paths a TOML config names (its string values starting with ``/``)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith("/"):
            found.append(value)

    walk(tomllib.loads(text))
    return found


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


# ------------------------------------------------------------- the processes, started once


@dataclass
class Demo:
    """The compose demo's enrollment, coordinator and endpoint, on loopback."""

    root: Path
    coordinator_metrics: str
    endpoint_metrics: str
    endpoint_url: str
    coordinator_stop_code: int
    coordinator_stop_s: float


def _enroll(root: Path) -> None:
    """The compose init service's script, its container paths under ``root``: ``fedlearn``
    calls through the real CLI (in this process), ``cp`` as a copy."""
    script = compose()["services"]["init"]["command"][0]
    runner = CliRunner()
    for words in shell_commands(script):
        if words[0] == "fedlearn":
            args = map_args(words[1:], root, {})
            result = runner.invoke(app, args)
            assert result.exit_code == 0, f"{words}: {result.output}"
        elif words[0] == "cp":
            source, target = (Path(f"{root}{w}") for w in words[1:])
            shutil.copyfile(source, target)
        else:  # set -e, and the guard that skips enrollment the second time
            assert words[0] in ("set", "if", "then", "fi"), words


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("container")
    for directory in ("etc/fedlearn/tls", "etc/fedlearn/ca", "etc/fedlearn/keys",
                      "etc/fedlearn/allowlist", "var/lib/fedlearn/state",
                      "var/lib/fedlearn/registry"):  # fmt: skip
        (root / directory).mkdir(parents=True)
    _enroll(root)
    services = compose()["services"]
    grpc_port, metrics_port = free_port(), free_port()
    coordinator_toml = root / "etc/fedlearn/coordinator.toml"
    text = map_paths((DEPLOY / "compose" / "coordinator.toml").read_text(), root)
    text = replace_once(text, '"0.0.0.0:7443"', f'"127.0.0.1:{grpc_port}"')
    text = replace_once(text, 'metrics_address = "0.0.0.0"', 'metrics_address = "127.0.0.1"')
    text = replace_once(text, "metrics_port = 9464", f"metrics_port = {metrics_port}")
    coordinator_toml.write_text(text)
    site_toml = root / "etc/fedlearn/site.toml"
    text = map_paths((DEPLOY / "compose" / "site-0.toml").read_text(), root)
    site_toml.write_text(replace_once(text, '"coordinator:7443"', f'"127.0.0.1:{grpc_port}"'))

    # what the coordinator would have published, for the endpoint to load
    registry = root / "var/lib/fedlearn/registry"
    with ModelRegistry(registry) as models:
        params = {"in_features": 30, "num_classes": 2, "hidden": 32}
        version = models.publish(
            "breast-cancer",
            model_to_arrays(build_model(**params)),
            run="breast-cancer",
            round=5,
            metrics={"accuracy": 0.9},
            client_summary=None,
            factory="clients.tabular:build_model",
            factory_params=params,
            signature={
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
            },
        )
        models.promote("breast-cancer", version.version, None)

    processes: list[subprocess.Popen[str]] = []
    site_stop = threading.Event()
    site_thread: threading.Thread | None = None
    try:
        http_port = free_port()
        endpoint_args = map_args(
            services["endpoint"]["command"], root, {"--http-port": http_port, "--grpc-port": 0}
        )
        endpoint = spawn(endpoint_args, processes)
        coordinator = spawn(map_args(services["coordinator"]["command"], root, {}), processes)
        # the site daemon from the compose service's config, as `fedlearn client` runs it
        # (in a thread: a process start fewer; tests/test_site_install.py runs the command)
        site_args = map_args(services["site-0"]["command"], root, {})
        assert site_args[site_args.index("--config") + 1] == str(site_toml)
        site = build_site(load_toml(SiteConfig, site_toml))
        site_thread = threading.Thread(target=site.run, args=(site_stop,), daemon=True)
        site_thread.start()

        url = f"https://127.0.0.1:{http_port}"
        ca = ssl.create_default_context(cafile=root / "etc/fedlearn/ca/ca.pem")

        def connected() -> str | None:
            text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            return text if "fedlearn_connected_clients 1.0" in text else None

        coordinator_metrics = wait_until(connected, coordinator, "site-0 joins the coordinator")
        assert site_thread.is_alive()
        wait_until(
            lambda: httpx.get(url + "/v2/health/ready", verify=ca, timeout=5).status_code == 200,
            endpoint,
            "the endpoint is ready",
        )
        endpoint_metrics = scrape(url + "/metrics", verify=ca)
        # what Kubernetes and compose stop it with: it stops within the StatefulSet's grace
        # period (exit 0 from its round loop; the default action if it is still starting)
        coordinator.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = coordinator.wait(timeout=60)
        yield Demo(root, coordinator_metrics, endpoint_metrics, url, code, time.monotonic() - start)
    finally:
        site_stop.set()
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if site_thread is not None:
            site_thread.join(timeout=10)


# ------------------------------------------------------------------ dashboards and alerts


def test_every_metric_the_dashboards_and_alerts_query_is_exported(demo: Demo) -> None:
    coordinator = sample_names(demo.coordinator_metrics)
    endpoint = sample_names(demo.endpoint_metrics)
    assert "fedlearn_rounds_total" in coordinator  # a counter with no series yet counts too
    assert "fedlearn_serving_request_seconds_bucket" in endpoint
    exported = coordinator | endpoint
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        exprs = dashboard_exprs(json.loads(path.read_text()))
        used[path.name] = set().union(*(promql_metrics(e) for e in exprs))
    used[ALERTS.name] = set().union(*(promql_metrics(r["expr"]) for r in alert_rules()))
    for name, metrics in used.items():
        assert metrics, f"{name} queries no metric"
        assert unknown_metrics(metrics, exported) == set(), f"{name}: not exported"
    # each dashboard shows every family its component exports
    families = {"coordinator.json": coordinator, "endpoint.json": endpoint}
    for name, names in families.items():
        shown = {names[m] for m in used[name] if m in names}
        assert shown == set(names.values()), f"{name} leaves out {set(names.values()) - shown}"


def test_a_renamed_or_mis_suffixed_metric_is_caught() -> None:
    exported = sample_names(
        "# HELP r_total x\n# TYPE r_total counter\n"
        '# HELP d x\n# TYPE d histogram\nd_bucket{le="+Inf"} 0\nd_sum 0\nd_count 0\n'
        "# HELP g x\n# TYPE g gauge\ng 1\n"
    )
    expr = 'sum(rate(r_total[5m])) / sum(rate(d_count[$__rate_interval])) and g{a="b"} > 0'
    assert promql_metrics(expr) == {"r_total", "d_count", "g"}
    assert unknown_metrics(promql_metrics(expr), exported) == set()
    # a counter without _total, a histogram without a suffix, a renamed gauge
    wrong = promql_metrics("rate(r[5m]) + histogram_quantile(0.5, d) + g2 + up")
    assert unknown_metrics(wrong, exported) == {"r", "d", "g2"}


def test_endpoint_dashboard_has_a_traffic_row_and_a_drift_row() -> None:
    """Below each row, up to the next one, panels that query that row's metrics only."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/endpoint.json").read_text())
    panels = dashboard["panels"]
    starts = [i for i, p in enumerate(panels) if p["type"] == "row"]
    for word, prefixes in (
        (
            "traffic",
            ("fedlearn_serving_traffic_", "fedlearn_serving_canary_", "fedlearn_serving_shadow_"),
        ),
        ("drift", ("fedlearn_serving_drift_",)),
    ):
        rows = [i for i in starts if word in panels[i]["title"].lower()]
        assert len(rows) == 1, word
        end = next((i for i in starts if i > rows[0]), len(panels))
        below = panels[rows[0] + 1 : end]
        assert below, word
        for panel in below:
            exprs = [t["expr"] for t in panel.get("targets", [])]
            assert exprs, panel["title"]
            names = set(re.findall(r"fedlearn_[a-z_]+", " ".join(exprs)))
            assert names and all(n.startswith(prefixes) for n in names), panel["title"]


def test_dashboards_are_well_formed() -> None:
    """Unique ids and uids, panels inside the 24-column grid and not on top of each other,
    every query on the dashboard's data source variable."""
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels), path.name
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (path.name, panel["title"])
            mine = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not mine & cells, f"{path.name}: {panel['title']} overlaps another panel"
            cells |= mine
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus"
    assert len(uids) == len(DASHBOARDS)


def test_alert_rules_are_complete_and_name_the_scrape_jobs() -> None:
    jobs = {
        c["job_name"]
        for c in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    names = set()
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule
        assert rule["annotations"]["summary"], rule
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        names.add(rule["alert"])
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, (rule["alert"], job)
    assert len(names) == len(alert_rules())


# --------------------------------------------------------------- the processes themselves


def test_the_entrypoints_come_up_as_the_manifests_run_them(demo: Demo) -> None:
    """Enrollment made the dev PKI, three keys and the allowlist; site-0 joined the TLS
    coordinator (its metrics say 1 site connected) and the coordinator stopped on SIGTERM
    within the StatefulSet's grace period; the endpoint answered both OIP health routes
    over TLS with the model loaded through the image's --path."""
    allowlist = (demo.root / "etc/fedlearn/allowlist/sites.toml").read_text()
    assert allowlist.count("[[site]]") == 3
    for i in range(3):
        assert (demo.root / f"etc/fedlearn/keys/site-{i}.key").is_file()
    assert demo.coordinator_stop_code in (0, -signal.SIGTERM)
    grace = next(
        w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for w, _, _ in containers()
        if w["kind"] == "StatefulSet"
    )
    assert demo.coordinator_stop_s < grace
    ca = ssl.create_default_context(cafile=demo.root / "etc/fedlearn/ca/ca.pem")
    for route in ("/v2/health/live", "/v2/health/ready", "/v2/models/breast-cancer/ready"):
        assert httpx.get(demo.endpoint_url + route, verify=ca, timeout=5).status_code == 200
    assert 'fedlearn_serving_model_version{model="breast-cancer"} 1.0' in demo.endpoint_metrics


# ------------------------------------------------------------------------------ images


def test_dockerfiles_copy_what_exists_and_run_the_cli() -> None:
    assert set(DOCKERFILES) == {"coordinator", "site", "endpoint"}
    ignored = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]  # fmt: skip
    expected = {
        "coordinator": "server",
        "site": "client",
        "endpoint": "serve",
    }
    for name, path in DOCKERFILES.items():
        steps = dockerfile(path)
        assert steps[0] == ("FROM", "python:3.11-slim"), path
        args = {k: v for k, _, v in (a.partition("=") for i, a in steps if i == "ARG")}
        torch = [a for i, a in steps if i == "RUN" and "torch" in a]
        assert torch == ['pip install --index-url "$TORCH_INDEX" torch==2.13.0'], path
        assert args["TORCH_INDEX"].endswith("/whl/cpu"), path
        for instruction, rest in steps:
            if instruction == "COPY":
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), f"{path.name}: COPY {source}"
                    assert source not in ignored, f"{path.name}: {source} is .dockerignored"
        command = image_command(path)
        assert command[0] == "fedlearn", path
        assert cli_command(command[1:]).name == expected[name], path
    extras = {n: dict(a.partition("=")[::2] for i, a in dockerfile(p) if i == "ARG")
              for n, p in DOCKERFILES.items()}  # fmt: skip
    assert extras["site"]["FEDLEARN_EXTRAS"] == "site"
    assert extras["coordinator"]["FEDLEARN_EXTRAS"] == "report"
    assert extras["endpoint"]["FEDLEARN_EXTRAS"] == "serve"


def test_the_site_image_extra_has_no_serving_plotting_or_sklearn() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = " ".join(project["dependencies"] + project["optional-dependencies"]["site"])
    for package in ("starlette", "uvicorn", "matplotlib", "scikit-learn", "scipy", "fedlearn["):
        assert package not in installed
    assert "serve" not in project["optional-dependencies"]["report"]


# ------------------------------------------------------------------------------ compose


def test_compose_file_follows_the_compose_spec_and_runs_real_commands() -> None:
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json")
                        .read_text())  # fmt: skip
    doc = compose()
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    assert errors == []
    services = doc["services"]
    built = {s["image"]: s["build"] for s in services.values() if "build" in s}
    assert set(built) == {f"fedlearn-{n}:demo" for n in ("coordinator", "site", "endpoint")}
    for build in built.values():
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        dockerfiles = {p.resolve() for p in DOCKERFILES.values()}
        assert (ROOT / build["dockerfile"]).resolve() in dockerfiles
    fedlearn_services = {
        n for n, s in services.items() if "monitoring" not in s.get("profiles", [])
    }
    assert fedlearn_services == {"init", "coordinator", "site-0", "site-1", "site-2", "endpoint"}
    for name in fedlearn_services:
        service = services[name]
        assert "build" in service, f"{name}: an image not built from deploy/docker"
        dockerfile_of = ROOT / service["build"]["dockerfile"]
        if name == "init":
            calls = fedlearn_calls(service["command"][0])
            assert [c[:2] for c in calls][:2] == [["certs", "dev"], ["keys", "generate"]]
            for call in calls:
                cli_command(call)
        else:
            assert image_command(dockerfile_of)[0] == "fedlearn"
            cli_command(service["command"])
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in doc["volumes"], f"{name}: volume {source}"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert source in doc["volumes"] or (COMPOSE.parent / source).exists(), source


def test_compose_configs_are_valid_and_everything_they_name_is_mounted() -> None:
    services = compose()["services"]
    generated = set(re.findall(r"--out (\S+)", services["init"]["command"][0]))
    for name, kind in [("coordinator", CoordinatorConfig)] + [
        (f"site-{i}", SiteConfig) for i in range(3)
    ]:
        service = services[name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        config_path = service["command"][service["command"].index("--config") + 1]
        source = COMPOSE.parent / mounts[config_path]
        config = load_toml(kind, source)
        for path in toml_paths(source.read_text()):
            assert under(path, list(mounts)), f"{name}: {path} is not mounted"
        if isinstance(config, SiteConfig):
            assert config.site.name == name
            assert config.site.key in generated  # the key init wrote for it
            assert config.coordinator.address == "coordinator:7443"
            # the demo's bundled data set needs scikit-learn, which the image has only so
            extras = service["build"]["args"]["FEDLEARN_EXTRAS"].split(",")
            assert config.data is not None and config.data.simulated is not None
            assert extras == ["site", "datasets"]
        else:
            assert config.server.address.endswith(":7443")
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t for c in prometheus["scrape_configs"] for s in c["static_configs"] for t in s["targets"]
    }
    assert targets == {"coordinator:9464", "endpoint:8000"}


# --------------------------------------------------------------------------- kubernetes


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    version = kubernetes_validate.latest_version()
    kinds = []
    for _, doc in k8s_docs():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert kinds.count("StatefulSet") == 1 and kinds.count("Deployment") == 3
    # the validator refuses what a typo makes
    _, deployment = next(d for d in k8s_docs() if d[1]["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_kustomization_renders_with_kubectl() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the schema validation above still ran)")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()
    )


def test_kubernetes_workloads_run_real_commands_with_their_configs_mounted(
    tmp_path: Path,
) -> None:
    maps = config_maps()
    images = {"coordinator": "server", "site": "client", "endpoint": "serve"}
    seen = set()
    for workload, pod, container in containers():
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        seen.add(component)
        image = container["image"].split(":")[0]
        assert image == f"fedlearn-{component}", image
        assert cli_command(container["args"]).name == images[component]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for mount in mounts.values():
            assert mount["name"] in volumes or mount["name"] in templates, mount
        args = container["args"]
        if component == "endpoint":
            for probe, route in (("readinessProbe", "/v2/health/ready"),
                                 ("livenessProbe", "/v2/health/live")):  # fmt: skip
                get = container[probe]["httpGet"]
                assert (get["path"], get["port"], get["scheme"]) == (route, "http", "HTTPS")
            for option in ("--registry", "--cert", "--key"):
                assert under(args[args.index(option) + 1], list(mounts)), option
            assert args[args.index("--path") + 1] == WORKDIR
            # it waits for the registry the coordinator creates (serve refuses a missing one)
            (wait,) = pod["initContainers"]
            registry = args[args.index("--registry") + 1]
            assert f"[ -f {registry}/registry.db ]" in wait["command"][-1]
            continue
        config_path = args[args.index("--config") + 1]
        config_map = volumes[mounts[config_path]["name"]]["configMap"]["name"]
        (text,) = maps[config_map].values()
        file = tmp_path / f"{config_map}.toml"
        file.write_text(text)
        config = load_toml(CoordinatorConfig if component == "coordinator" else SiteConfig, file)
        for path in toml_paths(text):
            assert under(path, list(mounts)), f"{config_map}: {path} is not mounted"
        if isinstance(config, CoordinatorConfig):
            assert workload["kind"] == "StatefulSet"
            state = mounts[config.server.state_dir]
            assert state["name"] in templates  # the state on the claim template's volume
            assert config.server.metrics_address == "0.0.0.0"
        else:
            assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 1
            key_dir = str(Path(config.site.key).parent)
            assert "secret" in volumes[mounts[key_dir]["name"]]  # the key is in a Secret
            assert config.coordinator.address == "fedlearn-coordinator:7443"
            # its own files: the slim image (no scikit-learn) reads them
            assert config.data is not None and under(str(config.data.path), ["/data"])
    assert seen == set(images)
    services = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "Service"}
    assert {"fedlearn-coordinator", "fedlearn-endpoint"} <= services


def test_cli_parsing_refuses_what_the_cli_refuses() -> None:
    assert cli_command(["keys", "generate", "--out", "k", "--name", "s"]).name == "generate"
    for bad in (["serve", "--no-such-option"], ["server"], ["nope"], ["keys"]):
        with pytest.raises((click.UsageError, AssertionError)):
            cli_command(bad)
