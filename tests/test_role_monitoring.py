"""Role monitoring: scrape targets from the spec, rules unit-tested by promtool, configs checked."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.render import FILES_DIR, HostFile
from infra.spec import ClusterSpec, load_spec
from infra.validators import ConfigRejected, check_prometheus, check_systemd_units
from roles import load_balancer, monitoring
from tests.conftest import EXAMPLE_SPECS, HOSTS

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
LAB = load_spec(HOSTS / "lab.yaml")
RULE_TESTS = FILES_DIR / "monitoring" / "tests" / "deepfleet.rules.test.yml"


def _server_files(spec: ClusterSpec) -> list[HostFile]:
    assert spec.monitoring is not None
    role = monitoring.plan(spec, spec.node(spec.monitoring.node))
    assert role is not None
    return [f for f in role.files if f.path.startswith("/etc/prometheus/")]


def _targets(spec: ClusterSpec) -> dict[str, list[tuple[str, dict[str, str]]]]:
    config = yaml.safe_load(monitoring.render_prometheus_config(spec))
    return {
        job["job_name"]: [
            (static["targets"][0], static["labels"]) for static in job["static_configs"]
        ]
        for job in config["scrape_configs"]
    }


def test_baremetal_targets_come_from_the_spec() -> None:
    targets = _targets(BAREMETAL)
    assert [t for t, _ in targets["node"]] == [
        "192.0.2.11:9100",
        "192.0.2.12:9100",
        "192.0.2.13:9100",
        "192.0.2.20:9100",
        "192.0.2.1:9100",
        "192.0.2.30:9100",
    ]
    assert [labels["node"] for _, labels in targets["dcgm"]] == ["gpu-01", "gpu-02", "gpu-03"]
    # One engine per replica, on its rank-0 node: r1 spans gpu-01 + gpu-02 and is scraped once.
    assert targets["sglang"] == [
        (
            "192.0.2.11:30000",
            {"node": "gpu-01", "deployment": "r1", "replica": "1", "role": "serve"},
        ),
        (
            "192.0.2.13:30000",
            {"node": "gpu-03", "deployment": "qwen-32b", "replica": "1", "role": "serve"},
        ),
    ]
    assert targets["haproxy"] == [("192.0.2.20:8404", {"node": "lb-01"})]
    assert "smg" not in targets


def test_smg_router_is_scraped_when_used() -> None:
    assert BAREMETAL.load_balancer is not None
    lb = BAREMETAL.load_balancer.model_copy(update={"router": "haproxy+smg"})
    spec = BAREMETAL.model_copy(update={"load_balancer": lb})
    assert _targets(spec)["smg"] == [
        (f"192.0.2.20:{monitoring.SMG_METRICS_PORT}", {"node": "lb-01"})
    ]


@pytest.mark.parametrize("router", ["haproxy+smg", "smg"])
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_smg_metrics_listen_where_prometheus_scrapes(spec_path: Path, router: str) -> None:
    """smg's --prometheus-host/--prometheus-port (roles.load_balancer) and the smg scrape target
    agree on every lb node: smg once listened on 127.0.0.1 while Prometheus, on another node,
    scraped the management address, so the target was always down."""
    spec = load_spec(spec_path)
    if spec.load_balancer is None or spec.monitoring is None:
        pytest.skip("no load balancer or monitoring in this spec")
    lb = spec.load_balancer.model_copy(update={"router": router})
    spec = spec.model_copy(update={"load_balancer": lb})
    scraped = {labels["node"]: target for target, labels in _targets(spec)["smg"]}
    assert sorted(scraped) == sorted(lb.nodes)
    for name in lb.nodes:
        args = load_balancer.smg_args(spec, spec.node(name))
        host = args[args.index("--prometheus-host") + 1]
        port = args[args.index("--prometheus-port") + 1]
        scraped_host, scraped_port = scraped[name].rsplit(":", 1)
        assert port == scraped_port
        # The scraped address itself, or every address (a node known by name only).
        assert host == scraped_host or (host == "0.0.0.0" and scraped_host == name)


def test_no_smg_target_without_chat_deployments() -> None:
    """smg runs only for chat deployments: an embeddings-only cluster has no smg to scrape."""
    assert LAB.load_balancer is not None
    lb = LAB.load_balancer.model_copy(update={"router": "haproxy+smg"})
    deployments = [d.model_copy(update={"embedding": True}) for d in LAB.deployments]
    spec = LAB.model_copy(update={"load_balancer": lb, "deployments": deployments})
    assert "smg" not in _targets(spec)
    assert "haproxy" in _targets(spec)


def test_expected_gpu_counts_are_rendered_per_node() -> None:
    assert monitoring.expected_gpus(BAREMETAL) == {"gpu-01": 8, "gpu-02": 8, "gpu-03": 4}
    rules = yaml.safe_load(monitoring.render_rules(BAREMETAL))
    expected = next(g for g in rules["groups"] if g["name"] == "deepfleet-expected")
    assert {r["labels"]["node"]: r["expr"] for r in expected["rules"]} == {
        "gpu-01": "vector(8)",
        "gpu-02": "vector(8)",
        "gpu-03": "vector(4)",
    }


def test_retention_and_listen_address_go_to_the_service_args() -> None:
    text = monitoring.render_prometheus_defaults(BAREMETAL)
    assert "--storage.tsdb.retention.time=15d" in text
    assert "--web.listen-address=192.0.2.30:9090" in text
    exporter = monitoring.render_node_exporter_defaults(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert 'ARGS="--web.listen-address=192.0.2.11:9100"' in exporter


def test_lab_skips_dcgm_and_grafana_install_and_says_so() -> None:
    gpu = monitoring.plan(LAB, LAB.node("gpu-01"))
    assert gpu is not None
    assert [f.path for f in gpu.files] == [monitoring.NODE_EXPORTER_DEFAULTS]
    assert monitoring.LAB_NOTE_DCGM in gpu.summary
    server = monitoring.plan(LAB, LAB.node("infra-01"))
    assert server is not None
    assert monitoring.LAB_NOTE_GRAFANA in server.summary
    assert "grafana" not in server.packages and "prometheus" in server.packages
    paths = {f.path for f in server.files}
    assert monitoring.GRAFANA_DATASOURCE in paths and monitoring.GRAFANA_DROPIN not in paths
    assert "dcgm" not in _targets(LAB)
    assert monitoring.expected_gpus(LAB) == {}


def test_every_node_gets_node_exporter_and_only_gpu_nodes_dcgm() -> None:
    for node in BAREMETAL.nodes:
        role = monitoring.plan(BAREMETAL, node)
        assert role is not None and "prometheus-node-exporter" in role.packages
        assert (monitoring.DCGM_UNIT in {f.path for f in role.files}) == (node.gpus is not None)


def test_grafana_datasource_points_at_prometheus() -> None:
    document = yaml.safe_load(monitoring.grafana_datasource(BAREMETAL))
    (source,) = document["datasources"]
    assert source["url"] == "http://192.0.2.30:9090" and source["uid"] == "deepfleet-prometheus"


@pytest.mark.parametrize("name", monitoring.DASHBOARDS)
def test_dashboards_use_the_provisioned_datasource(name: str) -> None:
    board = json.loads(monitoring.dashboard(name))
    assert board["uid"].startswith("deepfleet-")
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "deepfleet-prometheus"
        assert panel["targets"], panel["title"]


@pytest.mark.validators
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query as a recording rule: promtool parses the PromQL."""
    rules = []
    for name in monitoring.DASHBOARDS:
        for panel in json.loads(monitoring.dashboard(name))["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$node", ".*").replace("$deployment", ".*")
                rules.append({"record": f"dashboard:check{len(rules)}", "expr": expr})
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    subprocess.run(["promtool", "check", "rules", str(path)], check=True, capture_output=True)


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_promtool_accepts_config_and_rules(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    if spec.monitoring is not None:
        check_prometheus(_server_files(spec))


@pytest.mark.validators
def test_promtool_unit_tests_of_the_alert_rules(tmp_path: Path) -> None:
    (tmp_path / "deepfleet.rules.yml").write_text(monitoring.render_rules(BAREMETAL))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.validators
@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        (monitoring.PROMETHEUS_RULES, "DCGM_FI_DEV_GPU_TEMP >", "DCGM_FI_DEV_GPU_TEMP >>"),
        (monitoring.PROMETHEUS_RULES, "for: 5m", "for: five minutes"),
        (monitoring.PROMETHEUS_CONFIG, "scrape_interval: 15s", "scrape_interval: 15"),
        (monitoring.PROMETHEUS_CONFIG, "metrics_path: /metrics", "metrics_pat: /metrics"),
    ],
)
def test_promtool_rejects_a_broken_file(path: str, old: str, new: str) -> None:
    files = _server_files(BAREMETAL)
    broken = [
        HostFile(f.path, f.content.replace(old, new, 1)) if f.path == path else f for f in files
    ]
    assert broken != files
    with pytest.raises(ConfigRejected):
        check_prometheus(broken)


@pytest.mark.validators
def test_systemd_accepts_the_dcgm_unit() -> None:
    role = monitoring.plan(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert role is not None
    (unit,) = [f for f in role.files if f.path == monitoring.DCGM_UNIT]
    check_systemd_units([unit])
    assert " --gpus all " in unit.content and monitoring.DCGM_IMAGE in unit.content
    assert "--address 192.0.2.11:9400" in unit.content
    broken = HostFile(unit.path, unit.content.replace("Restart=always", "Restart=sometimes"))
    with pytest.raises(ConfigRejected):
        check_systemd_units([broken])
