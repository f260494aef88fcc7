"""Facts about the NVIDIA driver stack: what `nvidia-smi` sees, the loaded kernel module, holds.

Each fact is a pyinfra `FactBase` with a shell `command` and a pure `process(lines)`, so the
parsers are tested on captured outputs (tests/fixtures/gpu/) without a GPU. The commands never
fail the fact: a node without a driver, or with a driver/library mismatch after an install
without reboot, is a state to report, not an error that stops the deploy.
"""

from __future__ import annotations

from typing import TypedDict

from pyinfra.api.facts import FactBase

# Fields asked of nvidia-smi, in order; `process` relies on this order.
QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "driver_version",
    "persistence_mode",
    "memory.total",
    "ecc.errors.uncorrected.volatile.total",
)
EXIT_MARKER = "nvidia-smi-exit="


class Gpu(TypedDict):
    index: int
    name: str
    driver_version: str
    persistence_mode: bool
    memory_total_mib: int | None
    ecc_uncorrected: int | None  # None where ECC is off or not supported ("[N/A]")


class NvidiaSmiState(TypedDict):
    gpus: list[Gpu]
    # nvidia-smi's own words when it could not talk to the driver (exit code != 0), else None.
    error: str | None


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_nvidia_smi(lines: list[str]) -> NvidiaSmiState:
    """Parse `nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits` + exit line."""
    gpus: list[Gpu] = []
    other: list[str] = []
    exit_code = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith(EXIT_MARKER):
            exit_code = int(line[len(EXIT_MARKER) :] or 0)
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == len(QUERY_FIELDS) and fields[0].isdigit():
            gpus.append(
                Gpu(
                    index=int(fields[0]),
                    name=fields[1],
                    driver_version=fields[2],
                    persistence_mode=fields[3].lower() == "enabled",
                    memory_total_mib=_number(fields[4]),
                    ecc_uncorrected=_number(fields[5]),
                )
            )
        else:
            other.append(line)
    error = None
    if exit_code != 0:
        error = "; ".join(other) or f"nvidia-smi exited with {exit_code}"
    return NvidiaSmiState(gpus=gpus if exit_code == 0 else [], error=error)


class NvidiaSmi(FactBase[NvidiaSmiState | None]):
    """The GPUs as the driver reports them; None where nvidia-smi is not installed.

    .. code:: python

        {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver_version": "570.172.08",
                   "persistence_mode": True, "memory_total_mib": 81559, "ecc_uncorrected": 0}],
         "error": None}
    """

    def requires_command(self) -> str:
        return "nvidia-smi"

    def command(self) -> str:
        # `; echo` keeps the fact alive when nvidia-smi fails (e.g. "Driver/library version
        # mismatch" before the reboot): the failure is data for the verification step.
        return (
            f"nvidia-smi --query-gpu={','.join(QUERY_FIELDS)} --format=csv,noheader,nounits 2>&1; "
            f'echo "{EXIT_MARKER}$?"'
        )

    def process(self, output: list[str]) -> NvidiaSmiState:
        return parse_nvidia_smi(output)


class KernelModule(TypedDict):
    loaded: str | None  # /sys/module/nvidia/version: the module the running kernel uses
    installed: str | None  # modinfo: the module the next boot loads


def parse_kernel_module(lines: list[str]) -> KernelModule:
    values: dict[str, str | None] = {"loaded": None, "installed": None}
    for line in lines:
        key, _, value = line.partition("=")
        if key in values and value.strip():
            values[key] = value.strip()
    return KernelModule(loaded=values["loaded"], installed=values["installed"])


def reboot_pending(module: KernelModule | None) -> bool:
    """True when the installed nvidia module is not the one running (a reboot loads it)."""
    return bool(module and module["installed"] and module["installed"] != module["loaded"])


class NvidiaKernelModule(FactBase[KernelModule]):
    """Loaded versus installed `nvidia` kernel module versions."""

    def command(self) -> str:
        return (
            'echo "loaded=$(cat /sys/module/nvidia/version 2>/dev/null)"; '
            'echo "installed=$(modinfo -F version nvidia 2>/dev/null)"'
        )

    def process(self, output: list[str]) -> KernelModule:
        return parse_kernel_module(output)

    @staticmethod
    def default() -> KernelModule:
        return KernelModule(loaded=None, installed=None)


class FabricManagerState(FactBase[str]):
    """`systemctl is-active nvidia-fabricmanager`: active, inactive, failed, activating..."""

    def command(self) -> str:
        # is-active exits 3 for anything but active; the word it prints is what we want.
        return "systemctl is-active nvidia-fabricmanager 2>/dev/null || true"

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else "unknown"

    @staticmethod
    def default() -> str:
        return "unknown"


class HeldPackages(FactBase[list[str]]):
    """Packages marked held (`apt-mark showhold`), which apt upgrades never touch."""

    def requires_command(self) -> str:
        return "apt-mark"

    def command(self) -> str:
        return "apt-mark showhold"

    def process(self, output: list[str]) -> list[str]:
        return sorted({line.strip() for line in output if line.strip()})

    @staticmethod
    def default() -> list[str]:
        return []
