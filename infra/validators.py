"""Check rendered files with the real programs that will read them on the node.

A string test proves a template renders; only the consumer proves the result is accepted. The
checkers are Debian packages that `bootstrap.sh` installs (see docs/testing.md). Each function
raises `ConfigRejected` with the tool's own output when the tool refuses the file.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.render import HostFile


@dataclass
class ConfigRejected(Exception):
    tool: str
    path: str
    output: str

    def __str__(self) -> str:
        return f"{self.tool} rejected {self.path}:\n{self.output.strip()}"


class ToolMissing(RuntimeError):
    pass


def _tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    if not found:
        raise ToolMissing(f"{name} not found: install the Debian package {package}")
    return found


def _run(command: list[str], path: str, tool: str, *, stderr_fails: bool = False) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or (stderr_fails and result.stderr.strip()):
        raise ConfigRejected(tool, path, output or f"exit code {result.returncode}")
    return output


def check_netplan(files: list[HostFile]) -> dict[str, str]:
    """`netplan generate` over all of a host's netplan files; returns the networkd files made."""
    netplan = _tool("netplan", "netplan.io")
    with tempfile.TemporaryDirectory() as root:
        for host_file in files:
            target = Path(root) / host_file.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(host_file.content)
            target.chmod(0o600)
        paths = ", ".join(f.path for f in files)
        _run([netplan, "generate", "--root-dir", root], paths, "netplan generate")
        generated = Path(root) / "run/systemd/network"
        return (
            {p.name: p.read_text() for p in sorted(generated.glob("*"))}
            if generated.exists()
            else {}
        )


def check_chrony(host_file: HostFile) -> None:
    chronyd = _tool("chronyd", "chrony")
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write(host_file.content)
        conf.flush()
        # -p parses the file and prints it back: unknown directives are fatal errors.
        _run([chronyd, "-p", "-f", conf.name], host_file.path, "chronyd -p")


# Programs and units that packages installed by our roles provide on a node, but that this
# machine may lack. Only these are stubbed: a typo in any other path or unit still fails.
NODE_PROGRAMS = {
    "/usr/bin/docker",
    "/usr/bin/nvidia-smi",
    "/usr/bin/nvidia-persistenced",
    "/usr/bin/nv-fabricmanager",
    "/usr/bin/prometheus",
    "/usr/bin/prometheus-node-exporter",
    "/usr/sbin/haproxy",
    "/usr/sbin/keepalived",
    "/usr/sbin/chronyd",
    "/usr/sbin/nft",
    # smg, pip-installed into its virtualenv by the load_balancer role (roles.load_balancer.SMG_VENV).
    "/opt/deepfleet/smg/bin/smg",
}
NODE_UNITS = {
    "docker.service",
    "docker.socket",
    "containerd.service",
    "nvidia-persistenced.service",
    "nvidia-fabricmanager.service",
    "openibd.service",
    "prometheus.service",
    "prometheus-node-exporter.service",
    "haproxy.service",
    "chrony.service",
    "nfs-server.service",
}
EXEC_LINE = re.compile(r"^Exec[A-Za-z]*=[-@:+!]*(?P<path>/\S+)", re.MULTILINE)
UNIT_REF = re.compile(
    r"^(?:Requires|Wants|After|Before|BindsTo|PartOf|Requisite)=(?P<units>.+)$", re.MULTILINE
)


def check_systemd_units(files: list[HostFile]) -> None:
    """`systemd-analyze verify` in a scratch root holding this machine's stock units, our units,
    and stubs for the node programs/units listed above; any complaint is a failure."""
    analyze = _tool("systemd-analyze", "systemd")
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
        for merged in ("lib", "bin", "sbin"):
            (root / merged).symlink_to(f"usr/{merged}")
        units: list[str] = []
        for host_file in files:
            target = root / host_file.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(host_file.content)
            units.append(str(target))
            for match in EXEC_LINE.finditer(host_file.content):
                program = match.group("path")
                if program in NODE_PROGRAMS or Path(program).exists():
                    _stub(root / program.lstrip("/"), "#!/bin/sh\n", executable=True)
            for match in UNIT_REF.finditer(host_file.content):
                for unit in match.group("units").split():
                    if unit in NODE_UNITS:
                        _stub(
                            root / "etc/systemd/system" / unit, "[Service]\nExecStart=/bin/true\n"
                        )
        _run(
            [analyze, "verify", "--man=no", f"--root={root}", *units],
            ", ".join(f.path for f in files),
            "systemd-analyze verify",
            stderr_fails=True,
        )


def _stub(path: Path, content: str, executable: bool = False) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    if executable:
        path.chmod(0o755)


def check_apt_source(host_file: HostFile) -> None:
    """apt's own parser over a one-line-style source list: `apt-get update --print-uris` with
    only this file, which reads and resolves the entries and fetches nothing."""
    apt_get = _tool("apt-get", "apt")
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        source = root / "sources.list"
        source.write_text(host_file.content)
        (root / "lists/partial").mkdir(parents=True)
        options = {
            "Dir::Etc::sourcelist": source,
            "Dir::Etc::sourceparts": root / "none",
            "Dir::State::Lists": root / "lists",
            "Debug::NoLocking": 1,
        }
        _run(
            [apt_get, *(f"-o{k}={v}" for k, v in options.items()), "update", "--print-uris"],
            host_file.path,
            "apt-get update --print-uris",
            stderr_fails=True,
        )


def check_haproxy(host_file: HostFile) -> None:
    """`haproxy -c`; files the config references under /etc/haproxy (certificates, maps) are
    deployed separately from secrets, so stand-ins are made for them: a throwaway self-signed
    PEM for each certificate, an empty file for the rest."""
    haproxy = _tool("haproxy", "haproxy")
    with tempfile.TemporaryDirectory() as scratch:
        content = host_file.content
        for reference in sorted(set(re.findall(r"/etc/haproxy/[\w./-]+", content))):
            stand_in = Path(scratch) / reference.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            if reference.endswith(".pem"):
                _self_signed_pem(stand_in)
            else:
                stand_in.touch()
            content = content.replace(reference, str(stand_in))
        conf = Path(scratch) / "haproxy.cfg"
        conf.write_text(content)
        _run([haproxy, "-dW", "-c", "-f", str(conf)], host_file.path, "haproxy -c")


def _self_signed_pem(path: Path) -> None:
    key, cert = path.with_suffix(".key"), path.with_suffix(".crt")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=deepfleet-check",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    path.write_text(cert.read_text() + key.read_text())


def check_nginx(host_file: HostFile) -> None:
    nginx = _tool("nginx", "nginx-light")
    with tempfile.TemporaryDirectory() as prefix:
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(host_file.content)
        (Path(prefix) / "logs").mkdir()
        _run(
            [nginx, "-t", "-c", str(conf), "-p", prefix, "-g", "error_log stderr;"],
            host_file.path,
            "nginx -t",
        )


def check_nftables(host_file: HostFile) -> None:
    nft = _tool("nft", "nftables")
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as conf:
        conf.write(host_file.content)
        conf.flush()
        # A private network namespace: checking needs CAP_NET_ADMIN but must not touch ours.
        _run(["unshare", "-n", nft, "-c", "-f", conf.name], host_file.path, "nft -c")


def check_sshd(host_file: HostFile) -> None:
    sshd = _tool("sshd", "openssh-server")
    Path("/run/sshd").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        conf = Path(directory) / "sshd_config"
        key = Path(directory) / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        conf.write_text(host_file.content)
        _run([sshd, "-t", "-f", str(conf), "-h", str(key)], host_file.path, "sshd -t")


def check_prometheus(files: list[HostFile]) -> None:
    promtool = _tool("promtool", "prometheus")
    with tempfile.TemporaryDirectory() as root:
        config = None
        for host_file in files:
            target = Path(root) / host_file.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(host_file.content)
            if target.name == "prometheus.yml":
                config = target
        if config is not None:
            # Rule files are referenced by absolute node paths: check from the node's view.
            text = config.read_text().replace("/etc/prometheus/", f"{root}/etc/prometheus/")
            config.write_text(text)
            _run([promtool, "check", "config", str(config)], "prometheus.yml", "promtool")
        for host_file in files:
            if host_file.path.endswith(".rules.yml"):
                target = Path(root) / host_file.path.lstrip("/")
                _run([promtool, "check", "rules", str(target)], host_file.path, "promtool")


# Which checker reads which file a role writes. Checkers that need a host's whole set of
# files together (netplan merges its directory) take lists.
SINGLE_FILE_CHECKERS: list[tuple[str, Callable[[HostFile], None]]] = [
    ("/etc/chrony/chrony.conf", check_chrony),
    ("/etc/haproxy/haproxy.cfg", check_haproxy),
    ("/etc/nginx/nginx.conf", check_nginx),
    ("/etc/nftables.conf", check_nftables),
    ("/etc/nftables.d/*.nft", check_nftables),
    ("/etc/ssh/sshd_config", check_sshd),
    ("/etc/apt/sources.list.d/*.list", check_apt_source),
]
GROUP_CHECKERS: list[tuple[str, Callable[[list[HostFile]], object]]] = [
    ("/etc/netplan/*.yaml", check_netplan),
    ("/etc/systemd/system/*.service", check_systemd_units),
    ("/etc/systemd/system/*.mount", check_systemd_units),
    ("/etc/systemd/system/*.timer", check_systemd_units),
    ("/etc/prometheus/*", check_prometheus),
]


def check_host_files(files: list[HostFile]) -> list[str]:
    """Run every applicable checker over one host's files; return the checkers that ran."""
    ran: list[str] = []
    for pattern, checker in SINGLE_FILE_CHECKERS:
        for host_file in files:
            if fnmatch.fnmatch(host_file.path, pattern):
                checker(host_file)
                ran.append(f"{checker.__name__}:{host_file.path}")
    for pattern, group_checker in GROUP_CHECKERS:
        matching = [f for f in files if fnmatch.fnmatch(f.path, pattern)]
        if matching:
            group_checker(matching)
            ran.append(f"{group_checker.__name__}:{pattern}")
    return ran
