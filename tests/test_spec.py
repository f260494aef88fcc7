"""The cluster spec: examples validate; each rule rejects bad input with its location."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.cli import main
from infra.errors import UserError
from infra.sizing import SizingReport
from infra.spec import load_spec
from infra.spec_fit import replica_sizing
from tests.conftest import EXAMPLE_SPECS, HOSTS, pd_layout_text

BASE = (HOSTS / "example-baremetal.yaml").read_text()
LAB = (HOSTS / "lab.yaml").read_text()
# Has a prefill/decode pair and a DP-attention deployment, which the bare-metal example lacks.
LAYOUTS = (Path(__file__).parent / "fixtures" / "sglang" / "cluster.yaml").read_text()
PD_LAYOUT = pd_layout_text()


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.nodes


def test_cli_validate_accepts_all_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLE_SPECS)]) == 0
    assert capsys.readouterr().out.count("ok ") == len(EXAMPLE_SPECS)


@dataclass(frozen=True)
class Case:
    id: str
    old: str
    new: str
    message: str
    # The text whose line the error must point at (its `occurrence`-th appearance after editing).
    at: str
    occurrence: int = 1
    path: str | None = None
    base: str = BASE
    also: tuple[str, str] | None = None  # a second edit, when one rule needs two


CASES = [
    Case("unknown-top-key", "nvidia:\n", "nvidai:\n", "unknown key 'nvidai'", "nvidai:"),
    Case(
        "unknown-nested-key-suggests",
        "lacp_rate",
        "lacp_rat",
        "did you mean 'lacp_rate'",
        "lacp_rat",
    ),
    Case(
        "missing-required",
        "    servers: [192.0.2.2, 192.0.2.3]\n",
        "",
        "missing required key 'servers'",
        "dns:",
    ),
    Case("bad-ip", "address: 192.0.2.12\n", "address: 192.0.2.312\n", "IPv4", "192.0.2.312"),
    Case("vlan-range", "vlan: 12", "vlan: 5000", "less than or equal to 4094", "vlan: 5000"),
    Case(
        "vlan-id-on-bond-range",
        "{id: 12, link: bond1",
        "{id: 0, link: bond1",
        "greater than or equal to 1",
        "{id: 0",
    ),
    Case(
        "duplicate-node-name",
        "name: gpu-02",
        "name: gpu-01",
        "'gpu-01' is used twice",
        "name: gpu-01",
        2,
    ),
    Case(
        "duplicate-address",
        "address: 192.0.2.13\n",
        "address: 192.0.2.12\n",
        "also used by node 'gpu-02'",
        "address: 192.0.2.12\n",
        2,
    ),
    Case(
        "address-outside-network",
        "network: storage, address: 198.51.100.12",
        "network: storage, address: 192.0.2.99",
        "outside network 'storage'",
        "192.0.2.99",
    ),
    Case(
        "unknown-network",
        "network: storage, address: 198.51.100.13",
        "network: storag, address: 198.51.100.13",
        "network 'storag' is not defined",
        "storag,",
    ),
    Case(
        "bond-member-missing",
        "members: [intel]",
        "members: [intl]",
        "not one of the node's nics",
        "intl",
    ),
    Case(
        "vlan-link-missing",
        "{id: 12, link: bond1",
        "{id: 12, link: bond9",
        "neither a nic nor a bond",
        "bond9",
    ),
    Case(
        "address-interface-missing",
        "{interface: eno2, network: public, address: 203.0.113.20",
        "{interface: eno3, network: public, address: 203.0.113.20",
        "interface 'eno3' is not defined",
        "eno3",
    ),
    Case(
        "gateway-outside",
        "gateway: 192.0.2.1\n",
        "gateway: 198.51.100.1\n",
        "outside 192.0.2.0/24",
        "gateway: 198.51.100.1",
    ),
    Case(
        "default-route-without-gateway",
        "address: 198.51.100.11}",
        "address: 198.51.100.11, default_route: true}",
        "no gateway for a default route",
        "198.51.100.11, default",
    ),
    Case(
        "overlapping-networks",
        "cidr: 203.0.113.128/25",
        "cidr: 203.0.113.0/24",
        "overlaps network 'public'",
        "cidr: 203.0.113.0/24",
    ),
    Case(
        "gpu-group-without-gpus",
        "groups: [lb]",
        "groups: [lb, gpu]",
        "declares no gpus",
        "groups: [lb, gpu]",
    ),
    Case(
        "replica-node-missing",
        "replicas: [[gpu-03]]",
        "replicas: [[gpu-04]]",
        "node 'gpu-04' is not defined",
        "gpu-04",
    ),
    Case(
        "replica-node-not-gpu",
        "replicas: [[gpu-03]]",
        "replicas: [[lb-01]]",
        "not in group 'gpu'",
        "lb-01]]",
    ),
    Case(
        "node-in-two-replicas",
        "replicas: [[gpu-03]]",
        "replicas: [[gpu-02]]",
        "already serves r1 replica 1",
        "gpu-02]]",
        2,
    ),
    Case(
        "tp-does-not-match-gpus",
        "parallelism: {tp: 4}",
        "parallelism: {tp: 2}",
        "uses 2 GPUs but replica 1 has 4",
        "parallelism: {tp: 2}",
    ),
    Case(
        "tp-not-multiple-of-nodes",
        "parallelism: {tp: 16}",
        "parallelism: {tp: 15}",
        "not a multiple",
        "parallelism: {tp: 15}",
    ),
    Case(
        "model-missing",
        "model: r1-distill-qwen-32b",
        "model: r1-distill-qwen-23b",
        "did you mean 'r1-distill-qwen-32b'",
        "model: r1-distill-qwen-23b",
    ),
    Case(
        "storage-server-missing",
        "server: storage-01",
        "server: storage-09",
        "'storage-09' is not defined",
        "server: storage-09",
    ),
    Case(
        "one-server-per-export",
        "models:\n  - name: deepseek-r1",
        "  - name: models2\n    kind: nfs\n    server: storage-01\n    export: /srv/models\n    networks: [storage]\n"
        "models:\n  - name: deepseek-r1",
        "already served as 'models'",
        "export: /srv/models",
        2,
    ),
    Case(
        "lb-node-not-lb",
        "nodes: [lb-01]",
        "nodes: [nat-01]",
        "not in group 'lb'",
        "nodes: [nat-01]",
    ),
    Case(
        "port-collision",
        "port: 30000\n    api_key: {env: DEEPFLEET_API_KEY}\n    weight: 30",
        "port: 22\n    api_key: {env: DEEPFLEET_API_KEY}\n    weight: 30",
        "already used by ssh",
        "port: 22\n",
        2,
    ),
    Case(
        "dist-port-equals-port",
        "dist_port: 5000",
        "dist_port: 30000",
        "dist_port equals the serving port",
        "dist_port: 30000",
    ),
    Case(
        "world-open-api",
        "allowed_cidrs: [192.0.2.0/24, 203.0.113.0/25]",
        "allowed_cidrs: [0.0.0.0/0]",
        "open the inference API to the world",
        "allowed_cidrs",
    ),
    Case(
        "world-open-ssh",
        "admin_cidrs: [192.0.2.0/26]",
        "admin_cidrs: [0.0.0.0/0]",
        "open SSH",
        "admin_cidrs",
    ),
    Case(
        "bad-timezone",
        "timezone: Asia/Shanghai",
        "timezone: Asia/Shanghia",
        "unknown time zone",
        "timezone",
    ),
    Case("bad-enum-suggests", "lacp_rate", "lacp_rate: fats, x", "", "", base=""),  # replaced below
    Case(
        "nic-match-xor-macs",
        "{name: eno1, match: eno1}\n      - {name: eno2, match: eno2}\n    addresses:\n"
        "      - {interface: eno1, network: mgmt, address: 192.0.2.20}",
        "{name: eno1}\n      - {name: eno2, match: eno2}\n    addresses:\n"
        "      - {interface: eno1, network: mgmt, address: 192.0.2.20}",
        "either by 'match'",
        "{name: eno1}",
    ),
    Case(
        "bad-image-ref",
        "image: lmsysorg/sglang:v0.5.23-cu129@sha256:0c1e",
        "image: lmsysorg/sglang:v0.5.23 cu129@sha256:0c1e",
        "String should match pattern",
        "image: lmsysorg/sglang:v0.5.23 cu129",
    ),
    Case(
        "secret-needs-one-source",
        "api_key: {env: DEEPFLEET_API_KEY}\n    weight: 100",
        "api_key: {env: DEEPFLEET_API_KEY, file: /x}\n    weight: 100",
        "exactly one of 'env'",
        "api_key: {env: DEEPFLEET_API_KEY, file",
    ),
    Case(
        "mtu-range",
        "mtu: 9000\n    vlan: 12",
        "mtu: 19000\n    vlan: 12",
        "less than or equal to 9216",
        "mtu: 19000",
    ),
    Case(
        "nat-network-missing",
        "networks: [mgmt]\n\nmonitoring",
        "networks: [mgmnt]\n\nmonitoring",
        "network 'mgmnt' is not defined",
        "networks: [mgmnt]",
    ),
    Case("lab-kind-without-section", "kind: baremetal", "kind: lab", "go together", "kind: lab"),
    Case("bind-storage-outside-lab", "kind: nfs", "kind: bind", "only in the lab", "kind: bind"),
    Case(
        "model-does-not-fit",
        "replicas: [[gpu-01, gpu-02]]\n    parallelism: {tp: 16}",
        "replicas: [[gpu-01], [gpu-02]]\n    parallelism: {tp: 8}",
        "does not fit replica 1",
        "[gpu-01], [gpu-02]",
    ),
    Case(
        "tp-does-not-divide-heads",
        "gpus: {model: L40S, count: 4, memory_gb: 48, nvswitch: false}",
        "gpus: {model: L40S, count: 3, memory_gb: 48, nvswitch: false}",
        "does not divide",
        "parallelism: {tp: 3}",
        also=("parallelism: {tp: 4}", "parallelism: {tp: 3}"),
    ),
    Case(
        # Without memory_gb: with it, an unlisted name is sized as a custom card.
        "unknown-gpu-model",
        "gpus: {model: L40S, count: 4, memory_gb: 48",
        "gpus: {model: L40X, count: 4",
        "unknown GPU model 'L40X'",
        "model: L40X",
    ),
    Case(
        "unknown-gpu-model-hints-memory-gb",
        "gpus: {model: L40S, count: 4, memory_gb: 48",
        "gpus: {model: L40X, count: 4",
        "or set memory_gb to size a card the catalog lacks",
        "model: L40X",
    ),
    Case(
        "gpu-memory-above-the-board",
        "gpus: {model: L40S, count: 4, memory_gb: 48",
        "gpus: {model: L40S, count: 4, memory_gb: 96",
        "memory_gb 96 is more than one L40S has (48.3 GB",
        "memory_gb: 96",
    ),
    Case(
        "gpu-memory-above-the-board-suggests-the-board",
        "gpus: &h100x8 {model: H100, count: 8, memory_gb: 80",
        "gpus: &h100x8 {model: H100, count: 8, memory_gb: 94",
        "did you mean model 'H100-NVL'?",
        "memory_gb: 94",
    ),
    Case(
        # Below the board's own figure: a vGPU profile or MIG slice, sized as declared.
        "gpu-memory-reservation-is-sized",
        "gpus: {model: L40S, count: 4, memory_gb: 48",
        "gpus: {model: L40S, count: 4, memory_gb: 12",
        "but L40S (12 GB) has",
        "[[gpu-03]]",
    ),
    Case(
        "bootstrap-port-is-the-serving-port",
        "disaggregation: {prefill_replicas: [1]}",
        "disaggregation: {prefill_replicas: [1], bootstrap_port: 30000}",
        "port 30000 on node 'h200-03' is already used by deployment r1-pd",
        "bootstrap_port: 30000",
        base=PD_LAYOUT,
    ),
    Case(
        "bootstrap-port-is-ssh",
        "disaggregation: {prefill_replicas: [1]}",
        "disaggregation: {prefill_replicas: [1], bootstrap_port: 22}",
        "port 22 on node 'h200-03' is already used by ssh",
        "bootstrap_port: 22",
        base=PD_LAYOUT,
    ),
    Case(
        "dp-attention-without-dp",
        "parallelism: {tp: 8, dp: 8, dp_attention: true}",
        "parallelism: {tp: 8, dp_attention: true}",
        "dp_attention needs dp > 1",
        "parallelism: {tp: 8, dp_attention: true}",
        base=LAYOUTS,
    ),
    Case(
        # Valid for the field (0 < x < 1) but rendered with two decimals: --mem-fraction-static
        # 1.00, which only the generated command shows.
        "generated-engine-command-is-checked",
        "mem_fraction_static: 0.8",
        "mem_fraction_static: 0.999",
        "--mem-fraction-static must be between 0 and 1 (exclusive), not 1",
        "mem_fraction_static: 0.999",
        base=LAYOUTS,
    ),
    Case(
        "lab-host-address-outside",
        "host_address: 10.77.0.1",
        "host_address: 10.78.0.1",
        "outside 10.77.0.0/24",
        "host_address",
        base=LAB,
    ),
    Case(
        "lab-node-without-address",
        "    address: 10.77.0.12\n",
        "",
        "has no 'address'",
        "- name: gpu-02",
        base=LAB,
    ),
]
# An enum typo: the hint proposes the closest allowed value.
CASES[CASES.index(next(c for c in CASES if c.id == "bad-enum-suggests"))] = Case(
    "bad-enum-suggests",
    "vendor: intel, mtu: 1500}",
    "vendor: intle, mtu: 1500}",
    "did you mean 'intel'",
    "intle",
)


def _line_of(text: str, needle: str, occurrence: int) -> int:
    start = -1
    for _ in range(occurrence):
        start = text.index(needle, start + 1)
    return text.count("\n", 0, start) + 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_spec_is_rejected_with_location(case: Case, tmp_path: Path) -> None:
    assert case.old in case.base, f"case {case.id}: the base spec no longer contains {case.old!r}"
    text = case.base.replace(case.old, case.new, 1)
    if case.also:
        assert case.also[0] in text
        text = text.replace(*case.also, 1)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_spec(path)
    rendered = raised.value.render()
    assert case.message in rendered
    matching = [p for p in raised.value.problems if case.message in p.render()]
    assert matching, rendered
    assert matching[0].file == str(path)
    assert matching[0].line == _line_of(text, case.at, case.occurrence), rendered


def test_there_are_at_least_25_rules_tested() -> None:
    assert len({c.id for c in CASES}) >= 25


def test_cli_bad_spec_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("lacp_rate", "lacp_rat", 1))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:" in err and "hint: did you mean 'lacp_rate'" in err


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nprovider: {kind: lab\n")
    with pytest.raises(UserError) as raised:
        load_spec(path)
    assert raised.value.problems[0].line is not None


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        BASE.replace("name: example-baremetal\n", "name: example-baremetal\nname: again\n", 1)
    )
    with pytest.raises(UserError) as raised:
        load_spec(path)
    assert "duplicate" in raised.value.render().lower()


def test_missing_file_is_a_user_error() -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_spec("hosts/nope.yaml")


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        BASE.replace("dist_port: 5000", "dist_port: 30000").replace(
            "server: storage-01", "server: x"
        )
    )
    with pytest.raises(UserError) as raised:
        load_spec(path)
    assert len(raised.value.problems) >= 2


# --- GPU memory declared in the spec (nodes[].gpus.memory_gb) ----------------------------------


def _sizing_of(text: str, tmp_path: Path, deployment: str = "r1") -> SizingReport:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    spec = load_spec(path)
    chosen = next(d for d in spec.deployments if d.name == deployment)
    report = replica_sizing(spec, chosen, chosen.replicas[0])
    assert report is not None
    return report


def test_unlisted_gpu_with_memory_is_sized_as_a_custom_card(tmp_path: Path) -> None:
    text = BASE.replace(
        "{model: H100, count: 8, memory_gb: 80,", "{model: MI300X, count: 8, memory_gb: 192,"
    )
    report = _sizing_of(text, tmp_path)
    assert report.fits and report.gpu == "MI300X"
    assert report.gpu_memory_gb == pytest.approx(192, abs=0.01)
    assert any("not in the GPU catalog" in w for w in report.warnings)


def test_unlisted_gpu_too_small_names_the_size_command(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        BASE.replace(
            "{model: H100, count: 8, memory_gb: 80,", "{model: MI50, count: 8, memory_gb: 32,"
        )
    )
    with pytest.raises(UserError) as raised:
        load_spec(path)
    # The hint's command must run: the unlisted name needs the memory with it.
    assert (
        "deepfleet size --model deepseek-ai/DeepSeek-R1 --gpu MI50 --gpu-memory 32 "
        "--gpus-per-node 8" in raised.value.render()
    )


def test_board_figure_sizes_with_the_nvidia_smi_total(tmp_path: Path) -> None:
    # "80" is how an H100 is sold; the engine sees 81559 MiB = 85.5 GB, and so does sizing.
    assert "memory_gb: 80" in BASE
    assert _sizing_of(BASE, tmp_path).gpu_memory_gb == pytest.approx(85.52, abs=0.01)


def test_smaller_memory_than_the_board_is_what_sizing_uses(tmp_path: Path) -> None:
    text = BASE.replace(
        "{model: H100, count: 8, memory_gb: 80,", "{model: H100, count: 8, memory_gb: 70,"
    )
    report = _sizing_of(text, tmp_path)
    assert report.gpu == "H100 (70 GB)" and report.gpu_memory_gb == pytest.approx(70, abs=0.01)


def test_ambiguous_gpu_resolved_by_its_memory(tmp_path: Path) -> None:
    text = BASE.replace(
        "{model: H100, count: 8, memory_gb: 80,", "{model: A100, count: 8, memory_gb: 80,"
    )
    assert _sizing_of(text, tmp_path).gpu == "A100-80G"
