"""SGLang engine commands built from the spec, checked against the pinned sglang's own flags.

The flags come from the real installed sglang source (bootstrap.sh installs it); these tests
fail, not skip, when it is missing, with the command that installs it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from infra import sglang_flags
from infra.errors import UserError
from infra.sglang import (
    EngineLaunch,
    dist_timeout_s,
    launches_for_node,
    launches_for_spec,
)
from infra.sglang_flags import (
    SGLANG_VERSION,
    FlagInfo,
    check_engine_args,
    flag_definitions,
    known_flags,
)
from infra.spec import ClusterSpec, load_spec
from tests.conftest import pd_layout_text

PROJECT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "sglang"
LAUNCH = ["python3", "-m", "sglang.launch_server"]
SECRET = "sk-deepfleet-test-3f9a1c0b7e"


@pytest.fixture(scope="module")
def layouts() -> ClusterSpec:
    return load_spec(FIXTURES / "cluster.yaml")


@pytest.fixture(scope="module")
def pd_layouts(tmp_path_factory: pytest.TempPathFactory) -> ClusterSpec:
    path = tmp_path_factory.mktemp("pd") / "pd.yaml"
    path.write_text(pd_layout_text())
    return load_spec(path)


@pytest.fixture(scope="module")
def baremetal() -> ClusterSpec:
    return load_spec(PROJECT / "hosts" / "example-baremetal.yaml")


def _only(launches: list[EngineLaunch], deployment: str) -> list[EngineLaunch]:
    return [launch for launch in launches if launch.deployment == deployment]


def _docker_head(name: str, shm: str = "32g", *, rdma: bool = False) -> list[str]:
    head = ["docker", "run", "--rm", "--name", name, "--gpus", "all", "--network", "host"]
    head += ["--ipc", "host", "--shm-size", shm, "--ulimit", "memlock=-1"]
    head += ["--ulimit", "stack=67108864"]
    if rdma:
        head += ["--device", "/dev/infiniband", "--cap-add", "IPC_LOCK"]
    return head


# --- flags read from the installed sglang -------------------------------------------------------


def test_flags_come_from_the_installed_sglang_source() -> None:
    flags = known_flags()
    for name in (
        "--tp-size",
        "--dist-init-addr",
        "--enable-dp-attention",
        "--disaggregation-mode",
        "--reasoning-parser",
        "--model-path",
        "--mem-fraction-static",
        "--api-key",
    ):
        assert name in flags, name
    # Hundreds of flags: the dataclass fields (arg_groups/fields/*.py) and the add_argument ones.
    assert len(flag_definitions()) > 400
    assert flags["--tp-size"].value_type == "int"
    assert flags["--tensor-parallel-size"].name == "--tp-size"
    assert flags["--model-path"].required
    assert flags["--enable-metrics"].action == "store_true"
    assert flags["--enable-metrics"].takes_value is False
    assert flags["--disaggregation-mode"].choices == ("null", "prefill", "decode")
    assert "mooncake" in (flags["--disaggregation-transfer-backend"].choices or ())
    # Choices that live in other modules of the package (dynamic helper functions).
    assert "deepseek-r1" in (flags["--reasoning-parser"].choices or ())
    assert "deepseekv3" in (flags["--tool-call-parser"].choices or ())
    assert flags["--enable-dp-attention"].deprecated == "--attn-dp-size <dp-size>"
    assert flags["--context-length"].value_type == "human-int"
    assert "--no-dcp-replicate-q-proj" in flags  # argparse.BooleanOptionalAction
    assert flags["--dist-init-addr"].source.startswith("sglang/srt/arg_groups/fields/")


def test_tp_is_only_an_argparse_prefix() -> None:
    assert "--tp" not in known_flags()
    [problem] = check_engine_args(["--tp", "8"])
    assert "abbreviation" in problem and "--tp-size" in problem


def test_pinned_version_matches_bootstrap() -> None:
    text = (PROJECT / "bootstrap.sh").read_text(encoding="utf-8")
    assert re.search(rf"^SGLANG_VERSION={re.escape(SGLANG_VERSION)}\b", text, re.MULTILINE)


def test_missing_sglang_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sglang_flags.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as caught:
        sglang_flags.sglang_root()
    rendered = caught.value.render()
    assert "./bootstrap.sh setup" in rendered
    assert f"pip install --no-deps sglang=={SGLANG_VERSION}" in rendered


def test_validation_without_sglang_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _spec_with_extra_args(tmp_path, '["--chunked-prefill-size", "8192"]')
    monkeypatch.setattr(sglang_flags.importlib.util, "find_spec", lambda name: None)
    sglang_flags.flag_definitions.cache_clear()
    sglang_flags.known_flags.cache_clear()
    try:
        with pytest.raises(UserError, match=re.escape("sglang 0.5.23 source is not installed")):
            load_spec(path)
        # Specs without extra_args do not need the sglang source at all.
        assert load_spec(FIXTURES / "cluster.yaml").deployments
    finally:
        monkeypatch.undo()
        sglang_flags.flag_definitions.cache_clear()
        sglang_flags.known_flags.cache_clear()


def test_sglang_is_never_imported() -> None:
    code = (
        "import sys; from infra.sglang_flags import known_flags; known_flags(); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'sglang'], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT, check=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--tp-szie", "8"],
            "unknown sglang flag --tp-szie (sglang 0.5.23); did you mean --tp-size?",
        ),
        # Renamed in the 0.5 series: a spec written for an older release fails validation.
        (
            ["--cuda-graph-max-bs", "256"],
            "unknown sglang flag --cuda-graph-max-bs (sglang 0.5.23); "
            "did you mean --cuda-graph-max-bs-decode?",
        ),
        (["--tp-size"], "--tp-size needs a value"),
        (["--tp-size", "--enable-metrics"], "--tp-size needs a value"),
        (["--tp-size", "eight"], "--tp-size takes an integer, not 'eight'"),
        (["--mem-fraction-static", "most"], "--mem-fraction-static takes a number, not 'most'"),
        (
            ["--disaggregation-mode", "prefil"],
            "--disaggregation-mode 'prefil' is not one of: null, prefill, decode; "
            "did you mean 'prefill'?",
        ),
        (["--enable-metrics=yes"], "--enable-metrics takes no value (got '--enable-metrics=yes')"),
        (["8"], "unexpected value '8': sglang takes no positional arguments"),
        (
            ["--mem-fraction-static", "1.5"],
            "--mem-fraction-static must be between 0 and 1 (exclusive), not 1.5",
        ),
        (
            ["--enable-dp-attention"],
            "--enable-dp-attention is deprecated in sglang 0.5.23 and will be removed; "
            "use --attn-dp-size <dp-size>",
        ),
    ],
)
def test_check_engine_args_reports_problems(args: list[str], expected: str) -> None:
    assert check_engine_args(args) == [expected]


def test_semantic_checks_sglang_lacks() -> None:
    command = [*LAUNCH, "--model-path", "/models/x", "--tp-size", "3", "--nnodes", "2"]
    command += ["--node-rank", "2", "--dist-init-addr", "192.0.2.11"]
    assert check_engine_args(command) == [
        "--node-rank 2 must be below --nnodes 2 (ranks count from 0)",
        "--tp-size 3 is not divisible by --nnodes 2",
        "--dist-init-addr '192.0.2.11' needs host:port (e.g. 192.0.2.11:5000)",
    ]
    assert check_engine_args([*LAUNCH, "--nnodes", "2", "--tp-size", "16"]) == [
        "--nnodes > 1 needs --dist-init-addr <rank-0 host>:<port>",
        "--model-path is required",
    ]
    assert check_engine_args(["--dist-init-addr", "192.0.2.11:70000"]) == [
        "--dist-init-addr '192.0.2.11:70000': the port must be a number from 1 to 65535"
    ]


def test_well_formed_args_pass() -> None:
    args = ["--tp-size=8", "--context-length", "64k", "--api-key", "${SGLANG_API_KEY}"]
    args += ["--chunked-prefill-size", "8192", "--no-dcp-replicate-q-proj", "--ep", "8"]
    assert check_engine_args(args) == []


# --- engine commands --------------------------------------------------------------------------


def test_single_node_tp8_r1_on_h200(layouts: ClusterSpec) -> None:
    [launch] = _only(launches_for_spec(layouts), "r1")
    assert launch.engine_args == [
        *LAUNCH,
        *("--model-path", "/models/deepseek-r1", "--served-model-name", "deepseek-r1"),
        *("--tp-size", "8", "--host", "0.0.0.0", "--port", "30000"),
        *("--trust-remote-code", "--enable-metrics", "--context-length", "65536"),
        *("--mem-fraction-static", "0.88"),
        *("--reasoning-parser", "deepseek-r1", "--tool-call-parser", "deepseekv3"),
        *("--api-key", "${SGLANG_API_KEY}"),
    ]
    assert (launch.unit_name, launch.node, launch.replica, launch.rank, launch.role) == (
        "sglang-r1-r1",
        "h200-01",
        1,
        0,
        "serve",
    )
    assert launch.env == {
        "NCCL_SOCKET_IFNAME": "bond1.12",
        "GLOO_SOCKET_IFNAME": "bond1.12",
        "NCCL_DEBUG": "WARN",
    }
    script = (
        "exec python3 -m sglang.launch_server --model-path /models/deepseek-r1 "
        "--served-model-name deepseek-r1 --tp-size 8 --host 0.0.0.0 --port 30000 "
        "--trust-remote-code --enable-metrics --context-length 65536 "
        "--mem-fraction-static 0.88 --reasoning-parser deepseek-r1 "
        "--tool-call-parser deepseekv3 "
        '--api-key "${SGLANG_API_KEY:?is not set in /etc/deepfleet/r1.env}"'
    )
    assert launch.container_args == [
        *_docker_head("sglang-r1-r1"),
        *("-v", "/data/models/deepseek-r1:/models/deepseek-r1:ro"),
        *("--env-file", "/etc/deepfleet/r1.env"),
        *("-e", "GLOO_SOCKET_IFNAME=bond1.12", "-e", "NCCL_DEBUG=WARN"),
        *("-e", "NCCL_SOCKET_IFNAME=bond1.12"),
        *("--entrypoint", "/bin/sh", "lmsysorg/sglang:v0.5.23-cu129", "-c", script),
    ]
    assert "--privileged" not in launch.container_args


def test_two_node_tp16_r1_both_ranks(baremetal: ClusterSpec) -> None:
    rank0, rank1 = _only(launches_for_spec(baremetal), "r1")
    common_head = [
        *LAUNCH,
        *("--model-path", "/models/deepseek-r1", "--served-model-name", "deepseek-r1"),
        *("--tp-size", "16", "--host", "0.0.0.0", "--port", "30000"),
        *("--trust-remote-code", "--enable-metrics", "--context-length", "65536"),
        *("--mem-fraction-static", "0.87", "--nnodes", "2"),
    ]
    common_tail = [
        # 720 GB of FP8 weights read at 250 MB/s with 50% margin, above the spec's 3600 s.
        *("--dist-init-addr", "198.51.100.11:5000", "--dist-timeout", "4080"),
        *("--reasoning-parser", "deepseek-r1", "--tool-call-parser", "deepseekv3"),
        *("--api-key", "${SGLANG_API_KEY}"),
    ]
    assert rank0.engine_args == [*common_head, "--node-rank", "0", *common_tail]
    assert rank1.engine_args == [*common_head, "--node-rank", "1", *common_tail]
    assert [(x.node, x.rank, x.unit_name) for x in (rank0, rank1)] == [
        ("gpu-01", 0, "sglang-r1-r1-rank0"),
        ("gpu-02", 1, "sglang-r1-r1-rank1"),
    ]
    # The storage/RDMA VLAN carries the Mellanox bond: NCCL and Gloo use it. The RoCE GID index
    # is the node's, read at every start into an env file the container reads.
    expected_env = {
        "NCCL_SOCKET_IFNAME": "bond1.12",
        "GLOO_SOCKET_IFNAME": "bond1.12",
        "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1",
        "NCCL_DEBUG": "WARN",
    }
    assert rank1.nccl_env_command == [
        *(
            "/usr/local/sbin/deepfleet-nccl-env",
            "--out",
            "/run/deepfleet/sglang-r1-r1-rank1.nccl.env",
        ),
        *("mlx5_0:1:bond1.12", "mlx5_1:1:bond1.12"),
    ]
    assert rank0.env == expected_env and rank1.env == expected_env
    assert rank1.container_args[: len(_docker_head("x", rdma=True))] == _docker_head(
        "sglang-r1-r1-rank1", rdma=True
    )
    assert rank1.container_args[21:] == [
        *("-v", "/data/models/deepseek-r1:/models/deepseek-r1:ro"),
        *("--env-file", "/etc/deepfleet/r1.env"),
        *("--env-file", "/run/deepfleet/sglang-r1-r1-rank1.nccl.env"),
        *("-e", "GLOO_SOCKET_IFNAME=bond1.12", "-e", "NCCL_DEBUG=WARN"),
        *("-e", "NCCL_IB_HCA==mlx5_0:1,mlx5_1:1"),
        *("-e", "NCCL_SOCKET_IFNAME=bond1.12", "--entrypoint", "/bin/sh"),
        "lmsysorg/sglang:v0.5.23-cu129@sha256:"
        "0c1e4d9b7f5a0ef31e4bd8f8a1b3c5d2e6f7a8b9c0d1e2f3a4b5c6d7e8f90123",
        "-c",
        rank1.container_args[-1],
    ]
    assert shlex.split(rank1.container_args[-1])[1:-2] == rank1.engine_args[:-2]


def test_deployment_env_overrides_the_gid_index(baremetal: ClusterSpec) -> None:
    data = baremetal.model_dump()
    data["deployments"][0]["env"] = {"NCCL_IB_GID_INDEX": "5"}
    spec = ClusterSpec.model_validate(data)
    for launch in _only(launches_for_spec(spec), "r1"):
        # Pinned: no probe at start, and the container gets the spec's value.
        assert launch.env["NCCL_IB_GID_INDEX"] == "5"
        assert (launch.nccl_env_command, launch.nccl_env_file) == ([], None)
        assert "NCCL_IB_GID_INDEX=5" in launch.container_args
        assert not any(a.endswith(".nccl.env") for a in launch.container_args)


def test_dp_attention(layouts: ClusterSpec) -> None:
    [launch] = _only(launches_for_spec(layouts), "r1-dpa")
    # sglang 0.5.23 spells `--dp-size 8 --enable-dp-attention` as --attn-dp-size 8 (the old
    # spelling is deprecated there and resolves to the same attn_dp_size = 8, dp_size = 1).
    assert launch.engine_args == [
        *LAUNCH,
        *("--model-path", "/models/deepseek-r1", "--served-model-name", "deepseek-r1"),
        *("--tp-size", "8", "--attn-dp-size", "8", "--host", "0.0.0.0", "--port", "30000"),
        *("--trust-remote-code", "--enable-metrics", "--max-running-requests", "512"),
        *("--mem-fraction-static", "0.80"),
        *("--reasoning-parser", "deepseek-r1", "--tool-call-parser", "deepseekv3"),
        *("--api-key", "${SGLANG_API_KEY}"),
    ]


def test_prefill_decode_pair(pd_layouts: ClusterSpec) -> None:
    prefill, decode = _only(launches_for_spec(pd_layouts), "r1-pd")

    def expected(mode: str) -> list[str]:
        return [
            *LAUNCH,
            *("--model-path", "/models/deepseek-r1", "--served-model-name", "deepseek-r1"),
            *("--tp-size", "8", "--host", "0.0.0.0", "--port", "30000"),
            *("--trust-remote-code", "--enable-metrics", "--mem-fraction-static", "0.88"),
            *("--disaggregation-mode", mode, "--disaggregation-transfer-backend", "mooncake"),
            *("--disaggregation-bootstrap-port", "8998"),
            *("--disaggregation-ib-device", "mlx5_0,mlx5_1"),
            *("--reasoning-parser", "deepseek-r1", "--tool-call-parser", "deepseekv3"),
            *("--api-key", "${SGLANG_API_KEY}"),
        ]

    assert prefill.engine_args == expected("prefill")
    assert decode.engine_args == expected("decode")
    assert [(x.role, x.node, x.unit_name) for x in (prefill, decode)] == [
        ("prefill", "h200-03", "sglang-r1-pd-r1"),
        ("decode", "h200-04", "sglang-r1-pd-r2"),
    ]
    assert "IPC_LOCK" in decode.container_args and "/dev/infiniband" in decode.container_args


def test_distill_on_one_gpu_without_api_key(layouts: ClusterSpec) -> None:
    [launch] = _only(launches_for_spec(layouts), "distill")
    engine = [
        *LAUNCH,
        *("--model-path", "/models/deepseek-r1-distill-qwen-7b"),
        *("--served-model-name", "r1-distill-qwen-7b", "--tp-size", "1"),
        *("--host", "0.0.0.0", "--port", "30001", "--trust-remote-code", "--enable-metrics"),
        *("--mem-fraction-static", "0.90", "--reasoning-parser", "deepseek-r1"),
    ]
    assert launch.engine_args == engine
    assert launch.env_file is None
    assert launch.container_args == [
        *_docker_head("sglang-distill-r1", "8g"),
        "-v",
        "/data/models/deepseek-r1-distill-qwen-7b:/models/deepseek-r1-distill-qwen-7b:ro",
        *("-e", "GLOO_SOCKET_IFNAME=eno1", "-e", "NCCL_DEBUG=WARN"),
        *("-e", "NCCL_SOCKET_IFNAME=eno1", "lmsysorg/sglang:v0.5.23-cu129", *engine),
    ]


def test_launches_for_node(layouts: ClusterSpec, pd_layouts: ClusterSpec) -> None:
    assert [x.unit_name for x in launches_for_node(layouts, "h200-02")] == ["sglang-r1-dpa-r1"]
    assert [x.unit_name for x in launches_for_node(pd_layouts, "h200-04")] == ["sglang-r1-pd-r2"]
    assert launches_for_node(layouts, "h200-04") == []
    assert launches_for_node(layouts, "lb-01") == []


def test_lab_builds_the_same_commands_without_gpus() -> None:
    spec = load_spec(PROJECT / "hosts" / "lab.yaml")
    first, second = launches_for_spec(spec)
    assert first.engine_args[:4] == [*LAUNCH, "--model-path"]
    assert first.engine_args[4:] == second.engine_args[4:]
    assert "--gpus" not in first.container_args  # lab nodes have no GPUs to hand over
    assert check_engine_args(first.engine_args) == []


@pytest.mark.parametrize(
    "spec_file",
    [
        "tests/fixtures/sglang/cluster.yaml",
        *[f"hosts/{p.name}" for p in sorted((PROJECT / "hosts").glob("*.yaml"))],
    ],
)
def test_every_generated_command_passes_the_flag_check(spec_file: str, tmp_path: Path) -> None:
    paths = [PROJECT / spec_file]
    if spec_file.endswith("sglang/cluster.yaml"):
        paths.append(tmp_path / "pd.yaml")
        paths[-1].write_text(pd_layout_text())
    for path in paths:
        for launch in launches_for_spec(load_spec(path)):
            assert check_engine_args(launch.engine_args) == [], launch.unit_name


def test_dist_timeout_never_below_the_spec(baremetal: ClusterSpec) -> None:
    deployment = baremetal.deployments[1].model_copy(update={"dist_timeout_s": 7200})
    assert dist_timeout_s(deployment, baremetal.model("deepseek-r1")) == 7200
    small = baremetal.deployments[1]
    # The 32B distill's 65 GB load in under an hour: the spec's default stands.
    assert dist_timeout_s(small, baremetal.model("r1-distill-qwen-32b")) == 3600


# --- secrets ------------------------------------------------------------------------------------


def test_the_api_key_value_never_appears(
    monkeypatch: pytest.MonkeyPatch, baremetal: ClusterSpec
) -> None:
    monkeypatch.setenv("DEEPFLEET_API_KEY", SECRET)
    monkeypatch.setenv("SGLANG_API_KEY", SECRET)
    for launch in launches_for_spec(baremetal):
        rendered = " ".join(
            [*launch.engine_args, *launch.container_args, launch.shell_command, repr(launch)]
        )
        assert SECRET not in rendered
        assert "--api-key" in launch.engine_args
        assert launch.engine_args[launch.engine_args.index("--api-key") + 1] == "${SGLANG_API_KEY}"


def test_the_container_shell_refuses_to_start_without_the_key(layouts: ClusterSpec) -> None:
    [launch] = _only(launches_for_spec(layouts), "r1")
    script = launch.container_args[-1].replace("exec ", "printf '%s\\n' ", 1)
    empty = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={})
    assert empty.returncode != 0 and "is not set in /etc/deepfleet/r1.env" in empty.stderr
    given = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env={"SGLANG_API_KEY": SECRET}
    )
    assert given.stdout.splitlines()[-2:] == ["--api-key", SECRET]


# --- spec validation of extra_args --------------------------------------------------------------


def _spec_with_extra_args(tmp_path: Path, extra: str) -> Path:
    text = (FIXTURES / "cluster.yaml").read_text(encoding="utf-8")
    text = text.replace("    port: 30001\n", f"    port: 30001\n    extra_args: {extra}\n", 1)
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_misspelled_engine_flag_is_rejected_at_validation(tmp_path: Path) -> None:
    path = _spec_with_extra_args(tmp_path, '["--chunked-prefill-size", "8192", "--enable-metric"]')
    with pytest.raises(UserError) as caught:
        load_spec(path)
    [problem] = caught.value.problems
    assert problem.path == "deployments[2].extra_args[2]"
    assert problem.message == "unknown sglang flag --enable-metric (sglang 0.5.23)"
    assert problem.hint == "did you mean --enable-metrics?"
    assert problem.line == _line(path, "extra_args:")


def test_flags_deepfleet_sets_are_rejected_in_extra_args(tmp_path: Path) -> None:
    path = _spec_with_extra_args(tmp_path, '["--tp-size", "2", "--tensor-parallel-size=2"]')
    with pytest.raises(UserError) as caught:
        load_spec(path)
    problems = [(p.path, p.message, p.hint) for p in caught.value.problems]
    assert problems == [
        (
            "deployments[2].extra_args[2]",
            "--tp-size is given more than once (the last one would win)",
            None,
        ),
        (
            "deployments[2].extra_args[0]",
            "--tp-size is set by deepfleet from the spec",
            "use parallelism.tp instead of extra_args",
        ),
        (
            "deployments[2].extra_args[2]",
            "--tensor-parallel-size is set by deepfleet from the spec",
            "use parallelism.tp instead of extra_args",
        ),
    ]


def test_valid_extra_args_reach_the_command(tmp_path: Path) -> None:
    path = _spec_with_extra_args(
        tmp_path, '["--chunked-prefill-size", "8192", "--reasoning-parser", "qwen3"]'
    )
    [launch] = _only(launches_for_spec(load_spec(path)), "distill")
    assert launch.engine_args[-4:] == [
        "--chunked-prefill-size",
        "8192",
        "--reasoning-parser",
        "qwen3",
    ]
    assert launch.engine_args.count("--reasoning-parser") == 1  # the spec's choice wins


def _line(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


def test_flag_info_is_hashable_and_frozen() -> None:
    flag = known_flags()["--tp-size"]
    assert isinstance(flag, FlagInfo)
    with pytest.raises(AttributeError):
        flag.name = "--x"  # type: ignore[misc]


# --- the whole generated command, checked at validation (rule engine_commands_are_valid) --------


def _spec_with_fraction(tmp_path: Path, fraction: str) -> Path:
    # 0.999 passes the field's own check (0 < x < 1) and renders as --mem-fraction-static 1.00.
    text = (FIXTURES / "cluster.yaml").read_text(encoding="utf-8")
    assert "mem_fraction_static: 0.8\n" in text
    path = tmp_path / "spec.yaml"
    path.write_text(
        text.replace("mem_fraction_static: 0.8\n", f"mem_fraction_static: {fraction}\n")
    )
    return path


def test_generated_command_is_checked_at_validation(tmp_path: Path) -> None:
    path = _spec_with_fraction(tmp_path, "0.999")
    with pytest.raises(UserError) as caught:
        load_spec(path)
    [problem] = caught.value.problems
    assert problem.path == "deployments[1].mem_fraction_static"
    assert problem.message == (
        "the engine command for replica 1 rank 0 (node 'h200-02') is invalid: "
        "--mem-fraction-static must be between 0 and 1 (exclusive), not 1"
    )
    assert problem.line == _line(path, "mem_fraction_static: 0.999")
    assert load_spec(_spec_with_fraction(tmp_path, "0.95")).deployments


def test_generated_command_check_needs_the_sglang_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Without the source there is nothing to check against; validation goes on without it.
    path = _spec_with_fraction(tmp_path, "0.999")
    monkeypatch.setattr(sglang_flags.importlib.util, "find_spec", lambda name: None)
    assert load_spec(path).deployments


def test_mem_fraction_follows_the_declared_gpu_memory() -> None:
    """An L40S declared with 40 GB (a vGPU slice) gives the engine another memory fraction."""
    data = load_spec(PROJECT / "hosts/example-baremetal.yaml").model_dump(
        mode="json", exclude_defaults=True
    )

    def fractions(document: dict[str, object]) -> set[str]:
        found = set()
        for launch in launches_for_spec(ClusterSpec.model_validate(document)):
            line = " ".join(launch.container_args)
            if "--mem-fraction-static" in line:
                found.add(line.split("--mem-fraction-static", 1)[1].split()[0])
        return found

    board = fractions(data)
    for node in data["nodes"]:  # type: ignore[attr-defined]
        if node.get("gpus", {}).get("model") == "L40S":
            node["gpus"]["memory_gb"] = 40
    assert board and fractions(data) != board
