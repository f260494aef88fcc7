"""deepfleet-nccl-env (facts/roce_gid.py): the GID probe each RoCE engine unit runs at start.

It runs here as on a node: the file itself, by the machine's python3, against a sysfs tree laid
out like the kernel's (/sys/class/infiniband/<dev>/ports/<port>/{gids,gid_attrs/types,
gid_attrs/ndevs}/<index>) and filled from the captured GID tables in tests/fixtures/gpu/.
"""

from __future__ import annotations

import ast
import itertools
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from facts import roce_gid
from facts.rdma import parse_gids
from infra import check
from infra.acceptance.verdict import Check, Status
from infra.sglang import launches_for_node
from infra.spec import load_spec
from roles import sglang

PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = PROJECT / "tests/fixtures/gpu"
SCRIPT = PROJECT / "facts/roce_gid.py"
BAREMETAL = load_spec(PROJECT / "hosts/example-baremetal.yaml")
# The nodes run their own python3 (Ubuntu's), not the project's virtualenv.
NODE_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def gids(name: str) -> list[roce_gid.Gid]:
    return parse_gids((FIXTURES / name).read_text(encoding="utf-8").splitlines())


def fake_sysfs(root: Path, table: list[roce_gid.Gid], unpopulated: int = 2) -> Path:
    """A sysfs tree holding TABLE, plus UNPOPULATED empty entries per port after it (the kernel
    refuses to read those: EINVAL; a directory in their place fails to read too)."""
    ports: dict[tuple[str, int], int] = {}
    for entry in table:
        base = root / "class/infiniband" / entry["device"] / "ports" / str(entry["port"])
        for sub, value in (
            ("gids", entry["gid"]),
            ("gid_attrs/types", entry["type"]),
            ("gid_attrs/ndevs", entry["netdev"] or ""),
        ):
            (base / sub).mkdir(parents=True, exist_ok=True)
            (base / sub / str(entry["index"])).write_text(value + "\n")
        key = (entry["device"], entry["port"])
        ports[key] = max(ports.get(key, 0), entry["index"] + 1)
    for (device, port), first_free in ports.items():
        base = root / "class/infiniband" / device / "ports" / str(port)
        for index in range(first_free, first_free + unpopulated):
            (base / "gid_attrs/types" / str(index)).mkdir()
            (base / "gids" / str(index)).write_text("0000:" * 7 + "0000\n")
    return root


def run_probe(sysfs: Path, out: Path, *ports: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODE_PYTHON, str(SCRIPT), "--sysfs", str(sysfs), "--out", str(out), *ports],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",  # as on a node: nothing of the project importable
    )


def env_file(path: Path) -> dict[str, str]:
    """Read PATH the way `docker run --env-file` does: KEY=value lines, # comments."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_the_sysfs_reader_sees_what_the_fact_sees(tmp_path: Path) -> None:
    table = gids("gids-two-vlans.txt")
    ports = [roce_gid.Port("mlx5_0", 1, None)]
    assert roce_gid.read_gids(fake_sysfs(tmp_path, table), ports) == table


@pytest.mark.parametrize(
    ("fixture", "ports", "index"),
    [
        ("gids-hgx.txt", ["mlx5_0:1:bond1.12", "mlx5_1:1:bond1.12"], "3"),
        # An address on the port's own netdev came first: the bond's entry moved to 5.
        ("gids-two-vlans.txt", ["mlx5_0:1:bond1.12"], "5"),
        ("gids-two-vlans.txt", ["mlx5_0:1"], "3"),
    ],
)
def test_the_probe_writes_the_index_docker_reads(
    tmp_path: Path, fixture: str, ports: list[str], index: str
) -> None:
    out = tmp_path / "run/deepfleet/sglang-r1-r1-rank0.nccl.env"
    result = run_probe(fake_sysfs(tmp_path / "sys", gids(fixture)), out, *ports)
    assert result.returncode == 0, result.stderr
    assert env_file(out) == {"NCCL_IB_GID_INDEX": index}
    assert out.stat().st_mode & 0o777 == 0o644
    assert f"NCCL_IB_GID_INDEX={index}" in result.stdout
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no scratch file left


def test_a_port_without_an_ipv4_roce_v2_gid_stops_the_start(tmp_path: Path) -> None:
    out = tmp_path / "nccl.env"
    out.write_text("NCCL_IB_GID_INDEX=3\n")  # from an earlier start
    sysfs = fake_sysfs(tmp_path / "sys", gids("gids-no-address.txt"))
    result = run_probe(sysfs, out, "mlx5_0:1:bond1.12")
    assert result.returncode == 1
    assert result.stderr == (
        "deepfleet-nccl-env: mlx5_0 port 1: no RoCE v2 GID with an IPv4 address on bond1.12 "
        "(is the address up? check with `show_gids mlx5_0`)\n"
    )
    # A device missing from sysfs altogether (driver not loaded) is the same failure.
    assert run_probe(sysfs, out, "mlx5_9:1").returncode == 1
    assert env_file(out) == {"NCCL_IB_GID_INDEX": "3"}  # left alone: the unit does not start


def test_ports_that_disagree_stop_the_start(tmp_path: Path) -> None:
    table = gids("gids-two-vlans.txt") + [
        g for g in gids("gids-hgx.txt") if g["device"] == "mlx5_1"
    ]
    result = run_probe(
        fake_sysfs(tmp_path, table), tmp_path / "x.env", "mlx5_0:1:bond1.12", "mlx5_1:1:bond1.12"
    )
    assert result.returncode == 1
    assert "RoCE ports disagree on the GID index (mlx5_0 port 1: 5, mlx5_1 port 1: 3)" in (
        result.stderr
    )
    assert not (tmp_path / "x.env").exists()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    result = run_probe(tmp_path, tmp_path / "x.env", "mlx5_0")
    assert result.returncode == 2 and "expected DEVICE:PORT[:NETDEV]" in result.stderr


def test_the_units_probe_writes_the_file_their_container_reads(tmp_path: Path) -> None:
    """The ExecStartPre of each rendered RoCE unit, run as systemd would (script path swapped
    for this checkout's file), leaves the env file its ExecStart's docker run names."""
    sysfs = fake_sysfs(tmp_path / "sys", gids("gids-hgx.txt"))
    for node in ("gpu-01", "gpu-02"):
        for launch in launches_for_node(BAREMETAL, node):
            unit = sglang.render_unit(BAREMETAL, launch).content
            if not launch.nccl_env_command:
                assert "deepfleet-nccl-env" not in unit
                continue
            line = unit.split("\nExecStartPre=/usr/local/sbin/deepfleet-nccl-env ", 1)[1]
            argv = shlex.split(line.split("\nExecStart=", 1)[0].replace("\\\n", " "))
            out = Path(argv[argv.index("--out") + 1])
            local = tmp_path / out.relative_to("/")
            argv[argv.index("--out") + 1] = str(local)
            assert run_probe(sysfs, local, *argv[2:]).returncode == 0
            docker = shlex.split(
                unit.split("\nExecStart=", 1)[1].split("\nExecStop=")[0].replace("\\\n", " ")
            )
            assert ("--env-file", str(out)) in itertools.pairwise(docker)
            assert env_file(local) == {"NCCL_IB_GID_INDEX": "3"}
            # Gone when the engine stops: deepfleet check compares running engines only.
            assert f"\nExecStopPost=-/bin/rm -f {out}\n" in unit


def test_the_script_is_python_the_nodes_run() -> None:
    """Ubuntu 22.04's python3 is 3.10: nothing newer in the file's grammar."""
    ast.parse(SCRIPT.read_text(), feature_version=(3, 10))


def test_the_role_installs_this_file() -> None:
    plan = sglang.plan(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert plan is not None
    [installed] = [f for f in plan.files if f.path == "/usr/local/sbin/deepfleet-nccl-env"]
    assert installed.content == SCRIPT.read_text() and installed.mode == "755"
    assert installed.content.startswith("#!/usr/bin/python3\n")
    # Nodes without RoCE ports get neither the file nor the probe.
    gpu03 = sglang.plan(BAREMETAL, BAREMETAL.node("gpu-03"))
    assert gpu03 is not None
    assert all(f.path != installed.path for f in gpu03.files)


def test_deepfleet_check_compares_the_table_with_what_the_engines_started_with(
    tmp_path: Path,
) -> None:
    """The `roce-gid` probe section, run by sh as the probe script runs it (the node's script
    path swapped for this checkout's file and the fake sysfs), judged by the check."""
    exp = check.expectations(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert exp.gid_probe == (
        "/usr/local/sbin/deepfleet-nccl-env", "--out", "-", "mlx5_0:1:bond1.12", "mlx5_1:1:bond1.12"
    )  # fmt: skip
    assert exp.gid_env_files == ("/run/deepfleet/sglang-r1-r1-rank0.nccl.env",)
    moved = gids("gids-two-vlans.txt")  # bond1.12's entry at 5, on both ports
    sysfs = fake_sysfs(tmp_path / "sys", moved + [{**g, "device": "mlx5_1"} for g in moved])
    started = tmp_path / "sglang-r1-r1-rank0.nccl.env"
    local = replace(
        exp,
        gid_probe=(NODE_PYTHON, str(SCRIPT), "--sysfs", str(sysfs), *exp.gid_probe[1:]),
        gid_env_files=(str(started), str(tmp_path / "not-started.nccl.env")),
    )
    command = dict(check.probe_commands(local))["roce-gid"]

    def judge() -> Check:
        ran = subprocess.run(
            ["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        section = check.Section("roce-gid", ran.returncode, ran.stdout)
        return check.evaluate_node(local, {"roce-gid": section}).check("roce.gid_index")

    started.write_text("NCCL_IB_GID_INDEX=3\n")  # before the VLAN address moved the entry
    stale = judge()
    assert stale.status is Status.FAIL
    assert stale.message.startswith(
        "sglang-r1-r1-rank0 started with NCCL_IB_GID_INDEX=3, the GID table has it at 5 now"
    )
    started.write_text("NCCL_IB_GID_INDEX=5\n")  # restarted: the probe wrote the new index
    fresh = judge()
    assert fresh.status is Status.PASS
    assert fresh.message == (
        "NCCL_IB_GID_INDEX=5 from the GID table; 1 of 2 engines started with it (the others "
        "have not started yet)"
    )
    (sysfs / "class/infiniband/mlx5_1").rename(tmp_path / "gone")  # a port lost its device
    lost = judge()
    assert lost.status is Status.FAIL and "mlx5_1 port 1: no RoCE v2 GID" in lost.message
