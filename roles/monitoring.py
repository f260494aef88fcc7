"""Role `monitoring`: exporters on every node, Prometheus and Grafana on the monitoring node.

What each node gets (see docs/monitoring.md):
- every node: Debian's `prometheus-node-exporter`, listening on the node's management address
  at `monitoring.node_exporter_port` (ARGS in /etc/default/prometheus-node-exporter);
- GPU nodes (spec `gpus:`): NVIDIA's DCGM exporter, the pinned `DCGM_IMAGE` container run by the
  systemd unit `dcgm-exporter.service` with `--gpus all`, exporting the counters listed in
  /etc/dcgm-exporter/deepfleet-counters.csv (XID, ECC, temperature, clocks, memory bandwidth);
- the monitoring node: Debian's `prometheus` (config, alert rules, retention and listen address
  in /etc/default/prometheus) and Grafana from Grafana's apt repository (`GRAFANA_REPOSITORY`,
  `GRAFANA_KEY_URL`, both overridable for a mirror), with a provisioned Prometheus datasource
  and three dashboards (cluster overview, GPUs, SGLang serving).

Everything Prometheus scrapes is derived from the spec: node_exporter on all nodes, DCGM on GPU
nodes, every SGLang engine's /metrics (rank 0 of each replica), HAProxy's Prometheus endpoint
(stats_port /metrics) and the smg router's metrics port on the load balancer nodes.

The lab has no GPUs, no registry and no route to Grafana's repository: DCGM is skipped, Grafana is
not installed (its provisioning files are still written and checked), node_exporter and
Prometheus run for real from the lab's Debian apt cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from pyinfra.api.deploy import deploy
from pyinfra.operations import files, systemd

from infra.render import FILES_DIR, HostFile, RolePlan, render
from infra.spec import ClusterSpec, Monitoring, Node
from roles import _converge as converge
from roles._apt import install_packages
from roles._state import Probes

ROLE = "monitoring"

# Pinned images and repositories. An air-gapped site mirrors them and overrides these here.
DCGM_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04"
GRAFANA_REPOSITORY = "https://apt.grafana.com"
GRAFANA_KEY_URL = "https://apt.grafana.com/gpg.key"
GRAFANA_VERSION: str | None = None  # e.g. "11.3.0": pin grafana=<version>; None = newest
SMG_METRICS_PORT = 29000
"""smg's --prometheus-port. The load_balancer role imports it and binds smg's metrics to
`management_address()`, the address scraped here, so the two cannot disagree."""

NODE_EXPORTER_DEFAULTS = "/etc/default/prometheus-node-exporter"
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
PROMETHEUS_RULES = "/etc/prometheus/rules/deepfleet.rules.yml"
PROMETHEUS_DEFAULTS = "/etc/default/prometheus"
DCGM_UNIT = "/etc/systemd/system/dcgm-exporter.service"
DCGM_COUNTERS = "/etc/dcgm-exporter/deepfleet-counters.csv"
GRAFANA_KEYRING = "/etc/apt/keyrings/grafana.asc"
GRAFANA_SOURCE = "/etc/apt/sources.list.d/grafana.list"
GRAFANA_DATASOURCE = "/etc/grafana/provisioning/datasources/deepfleet.yaml"
GRAFANA_DASHBOARD_PROVIDER = "/etc/grafana/provisioning/dashboards/deepfleet.yaml"
GRAFANA_DASHBOARD_DIR = "/var/lib/grafana/dashboards/deepfleet"
GRAFANA_DROPIN = "/etc/systemd/system/grafana-server.service.d/deepfleet.conf"
DASHBOARDS = ("cluster-overview", "gpus", "sglang-serving")

HEADER = (
    "# Managed by deepfleet (role monitoring) from the cluster spec. Hand edits show up as drift.\n"
)
LAB_NOTE_DCGM = "lab: no GPUs, DCGM exporter skipped"
LAB_NOTE_GRAFANA = (
    "lab: Grafana not installed (no route to its apt repository or a registry); its "
    "provisioning files are written and checked, and Prometheus's own UI answers the same queries"
)


@dataclass(frozen=True)
class AlertThresholds:
    """Alert limits in one place (docs/monitoring.md lists them)."""

    gpu_temperature_c: int = 85
    clock_offset_s: float = 0.05
    queue_length: int = 100
    ttft_p95_s: float = 10.0
    node_down_for: str = "2m"


THRESHOLDS = AlertThresholds()


@dataclass(frozen=True)
class Target:
    address: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    targets: list[Target]
    metrics_path: str = "/metrics"


def management_address(spec: ClusterSpec, node: Node) -> str:
    """The address exporters listen on and Prometheus scrapes: the node's address on a
    management network, else the address pyinfra uses, else its name (cloud nodes: the base
    role's /etc/hosts maps it)."""
    for address in node.addresses:
        if spec.network(address.network).purpose == "management":
            return str(address.address)
    if node.address is not None:
        return str(node.address)
    return node.name


def listen_address(spec: ClusterSpec, node: Node, port: int) -> str:
    address = management_address(spec, node)
    # A name may not resolve before the base role ran: listen on all addresses then.
    return f"{address}:{port}" if address != node.name else f":{port}"


def has_gpus(node: Node) -> bool:
    return node.gpus is not None


def scrape_jobs(spec: ClusterSpec) -> list[ScrapeJob]:
    """Every job Prometheus scrapes, from the spec alone; empty jobs are left out."""
    mon = _monitoring(spec)
    jobs: list[ScrapeJob] = []
    monitoring_node = spec.node(mon.node)
    jobs.append(
        ScrapeJob(
            "prometheus",
            [
                Target(
                    f"{management_address(spec, monitoring_node)}:{mon.prometheus_port}",
                    {"node": monitoring_node.name},
                )
            ],
        )
    )
    jobs.append(
        ScrapeJob(
            "node",
            [
                Target(f"{management_address(spec, n)}:{mon.node_exporter_port}", {"node": n.name})
                for n in spec.nodes
            ],
        )
    )
    jobs.append(
        ScrapeJob(
            "dcgm",
            [
                Target(f"{management_address(spec, n)}:{mon.dcgm_exporter_port}", {"node": n.name})
                for n in spec.nodes
                if has_gpus(n) and not spec.is_lab
            ],
        )
    )
    engines: list[Target] = []
    for deployment in spec.deployments:
        prefill = (
            set(deployment.disaggregation.prefill_replicas) if deployment.disaggregation else set()
        )
        for number, replica in enumerate(deployment.replicas, start=1):
            rank0 = spec.node(replica[0])
            role = (
                "serve"
                if deployment.disaggregation is None
                else ("prefill" if number in prefill else "decode")
            )
            engines.append(
                Target(
                    f"{management_address(spec, rank0)}:{deployment.port}",
                    {
                        "node": rank0.name,
                        "deployment": deployment.name,
                        "replica": str(number),
                        "role": role,
                    },
                )
            )
    jobs.append(ScrapeJob("sglang", engines))
    lb = spec.load_balancer
    if lb is not None:
        lb_nodes = [spec.node(name) for name in lb.nodes]
        if "haproxy" in lb.router:
            jobs.append(
                ScrapeJob(
                    "haproxy",
                    [
                        Target(f"{management_address(spec, n)}:{lb.stats_port}", {"node": n.name})
                        for n in lb_nodes
                    ],
                )
            )
        # smg runs only for chat deployments (roles.load_balancer): no chat, no target.
        if "smg" in lb.router and any(not d.embedding for d in spec.deployments):
            jobs.append(
                ScrapeJob(
                    "smg",
                    [
                        Target(
                            f"{management_address(spec, n)}:{SMG_METRICS_PORT}", {"node": n.name}
                        )
                        for n in lb_nodes
                    ],
                )
            )
    return [job for job in jobs if job.targets]


def expected_gpus(spec: ClusterSpec) -> dict[str, int]:
    """GPUs per node the spec promises; the 'GPU missing' alert compares DCGM's count to it."""
    if spec.is_lab:
        return {}
    return {n.name: n.gpus.count for n in spec.nodes if n.gpus is not None}


def _monitoring(spec: ClusterSpec) -> Monitoring:
    if spec.monitoring is None:
        raise ValueError("the spec has no monitoring section")
    return spec.monitoring


# --- rendering -----------------------------------------------------------------------------------


def render_prometheus_config(spec: ClusterSpec) -> str:
    mon = _monitoring(spec)
    return render(
        "monitoring/prometheus.yml.j2",
        header=HEADER,
        cluster=spec.name,
        scrape_interval=f"{mon.scrape_interval_s}s",
        rules_file=PROMETHEUS_RULES,
        jobs=scrape_jobs(spec),
    )


def render_rules(spec: ClusterSpec) -> str:
    return render(
        "monitoring/deepfleet.rules.yml.j2",
        header=HEADER,
        expected_gpus=expected_gpus(spec),
        t=THRESHOLDS,
    )


def render_prometheus_defaults(spec: ClusterSpec) -> str:
    mon = _monitoring(spec)
    node = spec.node(mon.node)
    args = [
        f"--config.file={PROMETHEUS_CONFIG}",
        f"--storage.tsdb.retention.time={mon.retention_days}d",
        f"--web.listen-address={listen_address(spec, node, mon.prometheus_port)}",
    ]
    return HEADER + f'ARGS="{" ".join(args)}"\n'


def render_node_exporter_defaults(spec: ClusterSpec, node: Node) -> str:
    mon = _monitoring(spec)
    args = [f"--web.listen-address={listen_address(spec, node, mon.node_exporter_port)}"]
    return HEADER + f'ARGS="{" ".join(args)}"\n'


def render_dcgm_unit(spec: ClusterSpec, node: Node) -> str:
    mon = _monitoring(spec)
    return render(
        "monitoring/dcgm-exporter.service.j2",
        image=DCGM_IMAGE,
        counters=DCGM_COUNTERS,
        listen=listen_address(spec, node, mon.dcgm_exporter_port),
    )


def grafana_datasource(spec: ClusterSpec) -> str:
    mon = _monitoring(spec)
    url = f"http://{management_address(spec, spec.node(mon.node))}:{mon.prometheus_port}"
    document: dict[str, Any] = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": "deepfleet-prometheus",
                "type": "prometheus",
                "access": "proxy",
                "url": url,
                "isDefault": True,
                "editable": False,
                "jsonData": {"timeInterval": f"{mon.scrape_interval_s}s"},
            }
        ],
    }
    return HEADER + yaml.safe_dump(document, sort_keys=False)


def grafana_dashboard_provider() -> str:
    document = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "deepfleet",
                "folder": "deepfleet",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {"path": GRAFANA_DASHBOARD_DIR},
            }
        ],
    }
    return HEADER + yaml.safe_dump(document, sort_keys=False)


def grafana_dropin(spec: ClusterSpec) -> str:
    """Settings for grafana-server as GF_* variables (they override grafana.ini), in a drop-in:
    the package's own /etc/default/grafana-server stays untouched."""
    mon = _monitoring(spec)
    address = management_address(spec, spec.node(mon.node))
    return render(
        "monitoring/grafana-server.conf.j2",
        header=HEADER,
        http_addr="" if address == mon.node else address,
        http_port=mon.grafana_port,
        home_dashboard=f"{GRAFANA_DASHBOARD_DIR}/cluster-overview.json",
    )


def dashboard(name: str) -> str:
    """A dashboard as committed under files/monitoring/grafana/dashboards. Read as it is, not
    through jinja: Grafana's legends use {{label}} themselves."""
    text = (FILES_DIR / "monitoring" / "grafana" / "dashboards" / f"{name}.json").read_text()
    json.loads(text)  # a broken dashboard fails the plan, not Grafana at start
    return text


# --- plan ----------------------------------------------------------------------------------------


def _exporter_files(spec: ClusterSpec, node: Node) -> list[HostFile]:
    return [HostFile(NODE_EXPORTER_DEFAULTS, render_node_exporter_defaults(spec, node))]


def _dcgm_files(spec: ClusterSpec, node: Node) -> list[HostFile]:
    return [
        HostFile(DCGM_COUNTERS, render("monitoring/deepfleet-counters.csv")),
        HostFile(DCGM_UNIT, render_dcgm_unit(spec, node)),
    ]


def _server_files(spec: ClusterSpec) -> list[HostFile]:
    return [
        HostFile(PROMETHEUS_DEFAULTS, render_prometheus_defaults(spec)),
        HostFile(PROMETHEUS_CONFIG, render_prometheus_config(spec)),
        HostFile(PROMETHEUS_RULES, render_rules(spec)),
    ]


def _grafana_files(spec: ClusterSpec) -> list[HostFile]:
    # No secret in any of them (Grafana's admin password is set on first login): mode 644.
    result = [
        HostFile(GRAFANA_DATASOURCE, grafana_datasource(spec)),
        HostFile(GRAFANA_DASHBOARD_PROVIDER, grafana_dashboard_provider()),
    ]
    result += [
        HostFile(f"{GRAFANA_DASHBOARD_DIR}/{name}.json", dashboard(name)) for name in DASHBOARDS
    ]
    return result


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    mon = spec.monitoring
    if mon is None:
        return None
    role = RolePlan(role=ROLE)
    role.files = _exporter_files(spec, node)
    role.packages = ["prometheus-node-exporter"]
    role.services = ["prometheus-node-exporter"]
    role.summary = [
        f"node_exporter (prometheus-node-exporter) on "
        f"{listen_address(spec, node, mon.node_exporter_port)}"
    ]
    if node.in_group("gpu") or has_gpus(node):
        if spec.is_lab:
            role.summary.append(LAB_NOTE_DCGM)
        elif not has_gpus(node):
            role.summary.append("no `gpus:` in the spec for this node: DCGM exporter not run")
        else:
            role.files += _dcgm_files(spec, node)
            role.services.append("dcgm-exporter")
            role.summary.append(
                f"DCGM exporter {DCGM_IMAGE} (--gpus all) on "
                f"{listen_address(spec, node, mon.dcgm_exporter_port)}"
            )
    if node.name == mon.node:
        role.files += _server_files(spec)
        role.packages.append("prometheus")
        role.services.append("prometheus")
        jobs = ", ".join(f"{job.name}({len(job.targets)})" for job in scrape_jobs(spec))
        role.summary += [
            f"Prometheus on {listen_address(spec, node, mon.prometheus_port)}, every "
            f"{mon.scrape_interval_s}s, kept {mon.retention_days} days; jobs {jobs}",
            f"alert rules {PROMETHEUS_RULES} (GPU XID/ECC/temperature/missing, node down, "
            "clock offset, SGLang queue and TTFT p95)",
        ]
        role.files += _grafana_files(spec)
        if not spec.is_lab:
            role.files.append(HostFile(GRAFANA_DROPIN, grafana_dropin(spec)))
        if spec.is_lab:
            role.summary.append(LAB_NOTE_GRAFANA)
        else:
            role.packages.append("grafana")
            role.services.append("grafana-server")
            role.summary.append(
                f"Grafana from {GRAFANA_REPOSITORY} on port {mon.grafana_port}: Prometheus "
                f"datasource, dashboards {', '.join(DASHBOARDS)}"
            )
    return role


# --- apply ---------------------------------------------------------------------------------------


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(
        units=(
            "prometheus-node-exporter.service",
            "dcgm-exporter.service",
            "prometheus.service",
            "grafana-server.service",
        )
    )


@deploy("Monitoring (exporters, Prometheus, Grafana)")
def apply(spec: ClusterSpec, node: Node) -> None:
    from roles._files import put_file

    role = plan(spec, node)
    if role is None:
        return
    by_path = {f.path: f for f in role.files}
    converge.packages(
        name="[monitoring] Install prometheus-node-exporter",
        packages=["prometheus-node-exporter"],
        no_recommends=True,
    )
    exporter_args = put_file(by_path[NODE_EXPORTER_DEFAULTS], ROLE)
    systemd.service(
        name="[monitoring] Run prometheus-node-exporter on the management address",
        service="prometheus-node-exporter",
        running=True,
        enabled=True,
        restarted=True,
        _if=exporter_args.did_change,
    )
    converge.service(
        name="[monitoring] Enable prometheus-node-exporter",
        service="prometheus-node-exporter",
        running=True,
        enabled=True,
    )

    if DCGM_UNIT in by_path:
        counters = put_file(by_path[DCGM_COUNTERS], ROLE)
        unit = put_file(by_path[DCGM_UNIT], ROLE)
        counters_or_unit = [counters, unit]
        systemd.daemon_reload(name="[monitoring] Reload systemd units", _if=unit.did_change)
        systemd.service(
            name="[monitoring] Run the DCGM exporter container",
            service="dcgm-exporter",
            running=True,
            enabled=True,
            restarted=True,
            _if=lambda: any(op.did_change() for op in counters_or_unit),
        )
        converge.service(
            name="[monitoring] Enable the DCGM exporter",
            service="dcgm-exporter",
            running=True,
            enabled=True,
        )

    if PROMETHEUS_CONFIG not in by_path:
        return
    converge.packages(
        name="[monitoring] Install prometheus", packages=["prometheus"], no_recommends=True
    )
    defaults = put_file(by_path[PROMETHEUS_DEFAULTS], ROLE)
    config = put_file(by_path[PROMETHEUS_CONFIG], ROLE)
    rules = put_file(by_path[PROMETHEUS_RULES], ROLE)
    systemd.service(
        name="[monitoring] Restart Prometheus for new listen address or retention",
        service="prometheus",
        running=True,
        enabled=True,
        restarted=True,
        _if=defaults.did_change,
    )
    systemd.service(
        name="[monitoring] Reload Prometheus for new scrape targets or rules",
        service="prometheus",
        running=True,
        reloaded=True,
        _if=lambda: config.did_change() or rules.did_change(),
    )
    converge.service(
        name="[monitoring] Enable Prometheus", service="prometheus", running=True, enabled=True
    )

    if spec.is_lab:
        # No route to Grafana's repository in the lab: write the provisioning only (checked
        # offline by tests/test_role_monitoring.py), never install or start Grafana.
        for host_file in _grafana_files(spec):
            put_file(host_file, ROLE)
        return

    files.download(
        name=f"[monitoring] Download Grafana's repository key {GRAFANA_KEY_URL}",
        src=GRAFANA_KEY_URL,
        dest=GRAFANA_KEYRING,
        mode="644",
    )
    put_file(
        HostFile(
            GRAFANA_SOURCE,
            f"deb [signed-by={GRAFANA_KEYRING}] {GRAFANA_REPOSITORY} stable main\n",
        ),
        ROLE,
    )
    install_packages(
        "[monitoring] Install Grafana",
        [f"grafana={GRAFANA_VERSION}" if GRAFANA_VERSION else "grafana"],
        ROLE,
    )
    dropin = put_file(by_path[GRAFANA_DROPIN], ROLE)
    systemd.daemon_reload(name="[monitoring] Reload systemd units", _if=dropin.did_change)
    grafana_changes = [dropin] + [put_file(f, ROLE) for f in _grafana_files(spec)]
    systemd.service(
        name="[monitoring] Restart Grafana for new settings, datasource or dashboards",
        service="grafana-server",
        running=True,
        enabled=True,
        restarted=True,
        _if=lambda: any(op.did_change() for op in grafana_changes),
    )
    converge.service(
        name="[monitoring] Enable Grafana", service="grafana-server", running=True, enabled=True
    )
