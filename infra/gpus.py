"""GPUs deepfleet sizes for, with the figures that decide what fits and how fast it runs.

Units. Memory is recorded as the total ``nvidia-smi`` prints (MiB, 2**20 bytes), because that
is what the engine sees and what ``mem_fraction_static`` is a fraction of. Users read decimal
gigabytes (10**9 bytes), so ``memory_gb`` converts; an "80 GB" H100 shows 81559 MiB in
nvidia-smi, which is 79.6 GiB or 85.5 GB. Bandwidth is decimal GB/s, compute dense (no
sparsity) TFLOPS, all from the vendors' datasheets for the SXM/OAM board unless named PCIe.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from infra.errors import Problem, UserError

Architecture = Literal["Ampere", "Ada", "Hopper", "Blackwell"]
Interconnect = Literal["nvlink", "pcie"]

MIB = 2**20
GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class GpuModel:
    name: str
    """Canonical name, e.g. "H100"."""
    label: str
    """What the vendor sells it as, e.g. "H100 SXM5 80 GB HBM3"."""
    memory_mib: int
    """Total memory as nvidia-smi reports it (MiB)."""
    memory_type: str
    bandwidth_gbps: float
    """Memory bandwidth, decimal GB/s."""
    bf16_tflops: float
    """Dense BF16 tensor-core throughput, TFLOPS, without sparsity."""
    native_fp8: bool
    """FP8 tensor cores (Ada, Hopper, Blackwell); Ampere only emulates FP8 weights."""
    architecture: Architecture
    interconnect: Interconnect
    """GPU-to-GPU path inside a node: NVLink/NVSwitch, or PCIe only."""
    interconnect_gbps: float
    """Per-GPU bidirectional bandwidth of that path, decimal GB/s."""
    aliases: tuple[str, ...] = ()
    acceptance: Mapping[str, float] | None = None
    """Measured burn-in thresholds; filled by the acceptance suite, never guessed here."""
    listed: bool = True
    """False for a card known only by its memory (`custom_gpu`): its other figures are guesses."""

    @property
    def memory_gb(self) -> float:
        return self.memory_mib * MIB / GB

    @property
    def memory_gib(self) -> float:
        return self.memory_mib * MIB / GIB

    def with_memory_gb(self, memory_gb: float) -> GpuModel:
        """The same GPU with another usable memory (MIG slice, ECC mode, vGPU profile)."""
        return GpuModel(
            name=f"{self.name} ({memory_gb:g} GB)",
            label=self.label,
            memory_mib=round(memory_gb * GB / MIB),
            memory_type=self.memory_type,
            bandwidth_gbps=self.bandwidth_gbps,
            bf16_tflops=self.bf16_tflops,
            native_fp8=self.native_fp8,
            architecture=self.architecture,
            interconnect=self.interconnect,
            interconnect_gbps=self.interconnect_gbps,
            aliases=(),
            acceptance=self.acceptance,
        )


def custom_gpu(memory_gb: float, name: str | None = None) -> GpuModel:
    """A GPU known only by its memory (and the name the user gave it, if any); assumes no FP8
    so that sizing errs on the safe side."""
    return GpuModel(
        name=name or f"custom {memory_gb:g} GB",
        label="unlisted GPU",
        memory_mib=round(memory_gb * GB / MIB),
        memory_type="unknown",
        bandwidth_gbps=0.0,
        bf16_tflops=0.0,
        native_fp8=False,
        architecture="Ampere",
        interconnect="pcie",
        interconnect_gbps=0.0,
        listed=False,
    )


CATALOG: tuple[GpuModel, ...] = (
    GpuModel(
        name="RTX4090",
        label="GeForce RTX 4090 24 GB GDDR6X",
        memory_mib=24564,
        memory_type="GDDR6X",
        bandwidth_gbps=1008,
        bf16_tflops=165.2,
        native_fp8=True,
        architecture="Ada",
        interconnect="pcie",
        interconnect_gbps=64,
        aliases=("4090", "rtx-4090", "geforce-rtx-4090"),
    ),
    GpuModel(
        name="A10",
        label="A10 24 GB GDDR6 (PCIe)",
        # ECC is on by default on data-centre boards and costs 1.5 GiB here.
        memory_mib=23028,
        memory_type="GDDR6",
        bandwidth_gbps=600,
        bf16_tflops=125,
        native_fp8=False,
        architecture="Ampere",
        interconnect="pcie",
        interconnect_gbps=64,
        aliases=("a10-24g",),
    ),
    GpuModel(
        name="L40",
        label="L40 48 GB GDDR6 (PCIe)",
        memory_mib=46068,
        memory_type="GDDR6",
        bandwidth_gbps=864,
        bf16_tflops=181,
        native_fp8=True,
        architecture="Ada",
        interconnect="pcie",
        interconnect_gbps=64,
        aliases=("l40-48g",),
    ),
    GpuModel(
        name="L40S",
        label="L40S 48 GB GDDR6 (PCIe)",
        memory_mib=46068,
        memory_type="GDDR6",
        bandwidth_gbps=864,
        bf16_tflops=362,
        native_fp8=True,
        architecture="Ada",
        interconnect="pcie",
        interconnect_gbps=64,
        aliases=("l40s-48g",),
    ),
    GpuModel(
        name="A100-40G",
        label="A100 SXM4 40 GB HBM2",
        memory_mib=40960,
        memory_type="HBM2",
        bandwidth_gbps=1555,
        bf16_tflops=312,
        native_fp8=False,
        architecture="Ampere",
        interconnect="nvlink",
        interconnect_gbps=600,
        aliases=("a100-40", "a100-sxm4-40g"),
    ),
    GpuModel(
        name="A100-80G",
        label="A100 SXM4 80 GB HBM2e",
        memory_mib=81920,
        memory_type="HBM2e",
        bandwidth_gbps=2039,
        bf16_tflops=312,
        native_fp8=False,
        architecture="Ampere",
        interconnect="nvlink",
        interconnect_gbps=600,
        aliases=("a100-80", "a100-sxm4-80g"),
    ),
    GpuModel(
        name="H100",
        label="H100 SXM5 80 GB HBM3",
        memory_mib=81559,
        memory_type="HBM3",
        bandwidth_gbps=3350,
        bf16_tflops=989,
        native_fp8=True,
        architecture="Hopper",
        interconnect="nvlink",
        interconnect_gbps=900,
        aliases=("h100-80g", "h100-sxm", "h100-sxm5", "h100-sxm5-80g"),
    ),
    GpuModel(
        name="H100-PCIE",
        label="H100 PCIe 80 GB HBM2e",
        memory_mib=81559,
        memory_type="HBM2e",
        bandwidth_gbps=2000,
        bf16_tflops=756,
        native_fp8=True,
        architecture="Hopper",
        interconnect="pcie",
        interconnect_gbps=128,
        aliases=("h100-pcie-80g",),
    ),
    GpuModel(
        name="H100-NVL",
        label="H100 NVL 94 GB HBM3",
        memory_mib=95830,
        memory_type="HBM3",
        bandwidth_gbps=3900,
        bf16_tflops=835,
        native_fp8=True,
        architecture="Hopper",
        # NVLink bridges join pairs only; tensor parallelism across a node still crosses PCIe.
        interconnect="pcie",
        interconnect_gbps=128,
        aliases=("h100-nvl-94g",),
    ),
    GpuModel(
        name="H800",
        label="H800 SXM5 80 GB HBM3",
        memory_mib=81559,
        memory_type="HBM3",
        bandwidth_gbps=3350,
        bf16_tflops=989,
        native_fp8=True,
        architecture="Hopper",
        # The export variant of H100: same chip, NVLink cut to 400 GB/s.
        interconnect="nvlink",
        interconnect_gbps=400,
        aliases=("h800-80g", "h800-sxm"),
    ),
    GpuModel(
        name="H20-96G",
        label="H20 96 GB HBM3",
        memory_mib=97871,
        memory_type="HBM3",
        bandwidth_gbps=4000,
        bf16_tflops=148,
        native_fp8=True,
        architecture="Hopper",
        interconnect="nvlink",
        interconnect_gbps=900,
        # The 96 GB board came first and is what "H20" means in most quotes and recipes.
        aliases=("h20", "h20-96"),
    ),
    GpuModel(
        name="H20-141G",
        label="H20 141 GB HBM3e",
        # Same HBM3e stacks as H200; assumed to report the same total.
        memory_mib=143771,
        memory_type="HBM3e",
        bandwidth_gbps=4800,
        bf16_tflops=148,
        native_fp8=True,
        architecture="Hopper",
        interconnect="nvlink",
        interconnect_gbps=900,
        aliases=("h20-141", "h20-3e"),
    ),
    GpuModel(
        name="H200",
        label="H200 SXM 141 GB HBM3e",
        memory_mib=143771,
        memory_type="HBM3e",
        bandwidth_gbps=4800,
        bf16_tflops=989,
        native_fp8=True,
        architecture="Hopper",
        interconnect="nvlink",
        interconnect_gbps=900,
        aliases=("h200-141g", "h200-sxm"),
    ),
    GpuModel(
        name="H200-NVL",
        label="H200 NVL 141 GB HBM3e",
        memory_mib=143771,
        memory_type="HBM3e",
        bandwidth_gbps=4800,
        bf16_tflops=835,
        native_fp8=True,
        architecture="Hopper",
        # NVLink bridges join two or four boards; a node of eight still crosses PCIe.
        interconnect="pcie",
        interconnect_gbps=128,
        aliases=("h200-nvl-141g",),
    ),
    GpuModel(
        name="B200",
        label="B200 SXM 180 GB HBM3e",
        memory_mib=183359,
        memory_type="HBM3e",
        bandwidth_gbps=8000,
        bf16_tflops=2250,
        native_fp8=True,
        architecture="Blackwell",
        interconnect="nvlink",
        interconnect_gbps=1800,
        aliases=("b200-180g", "b200-sxm"),
    ),
)

# Names that match several boards: answering with one of them would size the wrong card.
_AMBIGUOUS: dict[str, tuple[str, ...]] = {"a100": ("A100-40G", "A100-80G")}


def _key(name: str) -> str:
    text = name.strip().lower()
    text = re.sub(r"^(?:(?:nvidia|geforce)[\s_-]*)+", "", text)
    text = re.sub(r"[\s_-]+", "", text)
    # nvidia-smi names end in the memory type ("NVIDIA H100 80GB HBM3"); it adds nothing.
    text = re.sub(r"(hbm\d*e?|gddr\d*x?)$", "", text)
    return re.sub(r"(\d)gb?$", r"\1g", text)


def _index() -> dict[str, GpuModel]:
    index: dict[str, GpuModel] = {}
    for gpu in CATALOG:
        for name in (gpu.name, *gpu.aliases):
            index.setdefault(_key(name), gpu)
    return index


_INDEX = _index()


def list_gpus() -> tuple[GpuModel, ...]:
    return CATALOG


CLI_UNLISTED_HINT = " (or give --gpu-memory GB for an unlisted card)"


class GpuMemoryMismatch(UserError):
    """A declared memory larger than the named board has."""


def find_gpu(name: str) -> GpuModel | None:
    """The catalog's GPU for a name or alias, or None when the catalog has no such card.

    Raises UserError for a name that matches several boards ("A100"): guessing one would size
    the wrong card.
    """
    key = _key(name)
    found = _INDEX.get(key)
    if found is not None:
        return found
    if key in _AMBIGUOUS:
        choices = _AMBIGUOUS[key]
        raise UserError(
            "ambiguous GPU model",
            [
                Problem(
                    f"{name!r} comes in several memory sizes",
                    hint=f"name one of: {', '.join(choices)}",
                )
            ],
        )
    return None


def resolve_gpu(name: str) -> GpuModel:
    """Find a GPU by name or alias, ignoring case, spaces, dashes and a "GB"/"G" suffix."""
    found = find_gpu(name)
    if found is not None:
        return found
    key = _key(name)
    close = difflib.get_close_matches(key, list(_INDEX), n=5, cutoff=0.5)
    # Several aliases of one card may match; name each card once, by its canonical name.
    cards = list(dict.fromkeys(_INDEX[c].name for c in close))[:3]
    hint = (
        f"did you mean {', '.join(repr(c) for c in cards)}?"
        if cards
        else "known GPUs: " + ", ".join(gpu.name for gpu in CATALOG)
    )
    raise UserError(
        "unknown GPU model",
        [
            Problem(
                f"{name!r} is not in the GPU catalog",
                hint=hint + CLI_UNLISTED_HINT,
            )
        ],
    )


# --- memory a spec declares ---------------------------------------------------------------------

LABEL_SLACK = 0.02
"""How far a declared memory may stray from a board's own figures and still mean that board."""


def label_band(gpu: GpuModel) -> tuple[float, float]:
    """The memory figures (decimal GB) that name this board's full memory.

    Vendors sell cards by a GiB-ish figure ("80 GB" for an H100 whose nvidia-smi total is
    79.6 GiB), tools print decimal GB (85.5 GB): both, and anything between, mean the whole board.
    """
    return gpu.memory_gib * (1 - LABEL_SLACK), gpu.memory_gb * (1 + LABEL_SLACK)


def declared_gpu(name: str, memory_gb: float | None) -> GpuModel:
    """The GPU a spec's `gpus: {model, memory_gb}` describes, as sizing must see it.

    * no memory_gb: the catalog's card (UserError when unknown or ambiguous);
    * a catalog card and its own figure ("H100", 80): that card with the exact nvidia-smi
      total, so a marketing figure does not shrink what sizing and mem_fraction_static see;
    * a catalog card and less (a MIG slice, a vGPU profile, memory reserved by the platform):
      that card with memory_gb;
    * a catalog card and more: UserError, since no such board exists and sizing on the larger
      figure would approve layouts that run out of memory when the weights load;
    * an ambiguous name ("A100", 80): the board whose figure it is;
    * a card the catalog lacks ("MI300X", 192): a custom card of that name and memory.
    """
    key = _key(name)
    if memory_gb is not None and key in _AMBIGUOUS:
        matching = [
            gpu
            for gpu in CATALOG
            if gpu.name in _AMBIGUOUS[key] and _within(memory_gb, label_band(gpu))
        ]
        if len(matching) == 1:
            return matching[0]
    gpu = find_gpu(name)
    if gpu is None:
        if memory_gb is None:
            return resolve_gpu(name)  # raises, with the nearest names
        return custom_gpu(memory_gb, name=name)
    if memory_gb is None:
        return gpu
    low, high = label_band(gpu)
    if memory_gb > high:
        others = [g.name for g in CATALOG if _within(memory_gb, label_band(g))]
        nearest = difflib.get_close_matches(gpu.name, others, n=1, cutoff=0)
        hint = (
            f"did you mean model {nearest[0]!r}? (or drop memory_gb: the catalog knows the board)"
            if nearest
            else "drop memory_gb (the catalog knows the board), or correct the model"
        )
        raise GpuMemoryMismatch(
            "GPU memory larger than the board",
            [
                Problem(
                    f"memory_gb {memory_gb:g} is more than one {gpu.name} has "
                    f"({gpu.memory_gb:.1f} GB, nvidia-smi {gpu.memory_mib} MiB)",
                    hint=hint,
                )
            ],
        )
    return gpu if memory_gb >= low else gpu.with_memory_gb(memory_gb)


def _within(value: float, band: tuple[float, float]) -> bool:
    return band[0] <= value <= band[1]
