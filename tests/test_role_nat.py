"""Role nat: the rules nft accepts, and that only the spec's nat.networks are translated."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.render import HostFile
from infra.spec import load_spec
from infra.validators import ConfigRejected, check_nftables
from roles import nat
from tests.conftest import EXAMPLE_SPECS, HOSTS

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
LAB = load_spec(HOSTS / "lab.yaml")


def _rules(spec_text: str, tmp_path: Path) -> tuple[str, list[str]]:
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text)
    spec = load_spec(path)
    assert spec.nat is not None
    role = nat.plan(spec, spec.node(spec.nat.node))
    assert role is not None
    return role.files[0].content, [str(c) for c in nat.translated_networks(spec)]


def test_only_nat_nodes_get_the_role() -> None:
    for spec_path in EXAMPLE_SPECS:
        spec = load_spec(spec_path)
        owners = [n.name for n in spec.nodes if nat.plan(spec, n) is not None]
        assert owners == ([spec.nat.node] if spec.nat else [])


def test_files_and_outside_interface() -> None:
    role = nat.plan(BAREMETAL, BAREMETAL.node("nat-01"))
    assert role is not None
    paths = [f.path for f in role.files]
    assert paths == [nat.RULES_FILE, nat.UNIT_FILE, nat.SYSCTL_FILE]
    rules = role.files[0].content
    assert 'oifname "eno2" ip saddr @inside_networks masquerade' in rules
    assert "net.ipv4.ip_forward = 1" in role.files[2].content
    # The lab's NAT node: its only interface is nspawn's host0 (infra/lab/plan.py NODE_IFACE).
    lab_role = nat.plan(LAB, LAB.node("infra-01"))
    assert lab_role is not None and 'oifname "host0"' in lab_role.files[0].content


def test_only_the_listed_networks_are_translated(tmp_path: Path) -> None:
    # The bare-metal example lists only mgmt; storage and public stay untranslated.
    rules = nat.plan(BAREMETAL, BAREMETAL.node("nat-01"))
    assert rules is not None
    text = rules.files[0].content
    elements = re.findall(r"elements = \{ (.*) \}", text)
    assert elements == ["192.0.2.0/24"]
    for other in ("198.51.100.0/24", "203.0.113.0/25", "203.0.113.128/25"):
        assert other not in text
    # Exactly one masquerade rule, and it is limited to the set.
    assert [line.strip() for line in text.splitlines() if "masquerade" in line] == [
        'oifname "eno2" ip saddr @inside_networks masquerade'
    ]
    # Two networks listed: both and nothing else.
    two = (
        (HOSTS / "example-baremetal.yaml")
        .read_text()
        .replace("  networks: [mgmt]\n\nmonitoring", "  networks: [mgmt, storage]\n\nmonitoring")
    )
    text, cidrs = _rules(two, tmp_path)
    assert cidrs == ["192.0.2.0/24", "198.51.100.0/24"]
    assert re.findall(r"elements = \{ (.*) \}", text) == ["192.0.2.0/24, 198.51.100.0/24"]


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_nft_accepts_the_rules(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node in spec.nodes:
        role = nat.plan(spec, node)
        if role is not None:
            check_nftables(role.files[0])


@pytest.mark.validators
def test_nft_rejects_a_broken_rule() -> None:
    role = nat.plan(BAREMETAL, BAREMETAL.node("nat-01"))
    assert role is not None
    broken = role.files[0].content.replace("masquerade", "masquerad")
    with pytest.raises(ConfigRejected, match="nft"):
        check_nftables(HostFile(nat.RULES_FILE, broken))
    with pytest.raises(ConfigRejected):
        check_nftables(
            HostFile(nat.RULES_FILE, role.files[0].content.replace("ip saddr", "ip sadr"))
        )


@pytest.mark.validators
def test_rules_load_in_a_private_namespace_and_reload_idempotently(tmp_path: Path) -> None:
    """Load the file into a kernel (a throwaway network namespace), twice, and read it back."""
    if shutil.which("unshare") is None or shutil.which("nft") is None:
        pytest.skip("needs unshare and nft")
    role = nat.plan(BAREMETAL, BAREMETAL.node("nat-01"))
    assert role is not None
    rules = tmp_path / "nat.nft"
    rules.write_text(role.files[0].content)
    script = f"nft -f {rules} && nft -f {rules} && nft -j list table ip deepfleet_nat"
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip("no CAP_NET_ADMIN here")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["nftables"]
    sets = [i["set"] for i in items if "set" in i]
    assert [s["name"] for s in sets] == ["inside_networks"]
    assert sets[0]["elem"] == [{"prefix": {"addr": "192.0.2.0", "len": 24}}]
    rules_loaded = [i["rule"] for i in items if "rule" in i]
    masquerades = [r for r in rules_loaded if any("masquerade" in e for e in r["expr"])]
    assert len(masquerades) == 1 and masquerades[0]["chain"] == "postrouting"
    assert sum(1 for i in items if "table" in i) == 1  # reloading replaced, not duplicated
