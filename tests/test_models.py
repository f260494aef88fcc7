"""Model and GPU catalogs: architecture facts, lookups, local config.json parsing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra.errors import UserError
from infra.gpus import list_gpus, resolve_gpu
from infra.models import list_models, load_model_dir, resolve_model

FIXTURES = Path(__file__).parent / "fixtures" / "models"

# Parameter counts as the model cards / safetensors metadata publish them. V3/R1 cards say 685B:
# that includes the 14B multi-token-prediction layer, which the engine loads only for
# speculative decoding, so the main model's 671B is what we size.
PUBLISHED_PARAMS = {
    "deepseek-ai/DeepSeek-R1": 671e9,
    "deepseek-ai/DeepSeek-R1-0528": 671e9,
    "deepseek-ai/DeepSeek-V3": 671e9,
    "deepseek-ai/DeepSeek-V3-0324": 671e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": 14_770_033_664,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32_763_876_352,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": 8_030_261_248,
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": 70_553_706_496,
    "BAAI/bge-m3": 567_754_752,
}


def test_catalog_covers_the_published_models() -> None:
    assert {m.hf_id for m in list_models()} == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("hf_id", sorted(PUBLISHED_PARAMS))
def test_derived_parameter_count_matches_published(hf_id: str) -> None:
    model = resolve_model(hf_id)
    assert model.params == pytest.approx(PUBLISHED_PARAMS[hf_id], rel=0.001)


def test_r1_architecture_facts() -> None:
    r1 = resolve_model("r1")
    assert (r1.num_layers, r1.num_attention_heads, r1.hidden_size, r1.vocab_size) == (
        61,
        128,
        7168,
        129280,
    )
    assert (r1.kv_lora_rank, r1.qk_rope_head_dim) == (512, 64)
    assert r1.dtype == "fp8" and r1.is_moe and r1.uses_mla
    assert r1.active_params == pytest.approx(37e9, rel=0.02)
    assert r1.fp8_block_size == 128


@pytest.mark.parametrize(
    ("hf_id", "layers", "hidden", "heads", "kv_heads", "head_dim", "vocab"),
    [
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 28, 1536, 12, 2, 128, 151936),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 28, 3584, 28, 4, 128, 152064),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 48, 5120, 40, 8, 128, 152064),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 64, 5120, 40, 8, 128, 152064),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 32, 4096, 32, 8, 128, 128256),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 80, 8192, 64, 8, 128, 128256),
    ],
)
def test_distill_architecture_facts(
    hf_id: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, vocab: int
) -> None:
    model = resolve_model(hf_id)
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (
        layers,
        hidden,
        heads,
    )
    assert (model.num_kv_heads, model.head_dim, model.vocab_size) == (kv_heads, head_dim, vocab)
    assert model.dtype == "bf16" and model.kind == "dense"


def test_bge_m3_is_an_embedding_model_served_in_16_bits() -> None:
    bge = resolve_model("bge-m3")
    assert bge.is_embedding and bge.dtype == "bf16" and bge.max_context == 8192
    assert bge.kv_elements_per_token_per_gpu(1) == 0


@pytest.mark.parametrize(
    ("name", "hf_id"),
    [
        ("r1", "deepseek-ai/DeepSeek-R1"),
        ("deepseek-r1", "deepseek-ai/DeepSeek-R1"),
        ("DEEPSEEK-AI/deepseek-r1", "deepseek-ai/DeepSeek-R1"),
        ("v3", "deepseek-ai/DeepSeek-V3"),
        ("v3-0324", "deepseek-ai/DeepSeek-V3-0324"),
        ("r1-0528", "deepseek-ai/DeepSeek-R1-0528"),
        ("r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ("qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        ("DeepSeek-R1-Distill-Llama-70B", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
        ("deepseek-r1:32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"),
        (" Llama-8B ", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
        ("baai/BGE-M3", "BAAI/bge-m3"),
    ],
)
def test_resolve_model_by_id_or_alias(name: str, hf_id: str) -> None:
    assert resolve_model(name).hf_id == hf_id


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError) as caught:
        resolve_model("deepseek-r2")
    rendered = caught.value.render()
    assert "unknown model" in rendered
    assert "did you mean" in rendered and "deepseek-r1" in rendered


def test_missing_directory_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model("./no/such/model-dir")


def test_local_config_parses_like_the_catalog_entry() -> None:
    local = resolve_model(FIXTURES / "r1-distill-qwen-7b")
    catalog = resolve_model("qwen-7b")
    assert local.source.endswith("config.json") and local.hf_id == "r1-distill-qwen-7b"
    ignore = {"hf_id", "aliases", "source"}
    fields = [f.name for f in dataclasses.fields(local) if f.name not in ignore]
    assert {f: getattr(local, f) for f in fields} == {f: getattr(catalog, f) for f in fields}


def test_local_r1_config_with_all_published_fields() -> None:
    local = load_model_dir(FIXTURES / "deepseek-r1")
    catalog = resolve_model("r1")
    assert local.params == catalog.params and local.dtype == "fp8"
    assert local.replicated_params == catalog.replicated_params
    # A path to the file itself works as well as its directory.
    assert load_model_dir(FIXTURES / "deepseek-r1" / "config.json").params == catalog.params


@pytest.mark.parametrize(
    ("fixture", "dtype"),
    [
        ("r1-distill-qwen-32b-awq", "int4"),
        ("deepseek-r1-channel-int8", "int8"),
        ("deepseek-r1", "fp8"),
        ("bge-m3", "bf16"),
    ],
)
def test_quantization_config_decides_the_dtype(fixture: str, dtype: str) -> None:
    assert resolve_model(str(FIXTURES / fixture)).dtype == dtype


def test_quantized_local_model_keeps_its_architecture() -> None:
    awq = resolve_model(FIXTURES / "r1-distill-qwen-32b-awq")
    assert awq.hf_id == "example/DeepSeek-R1-Distill-Qwen-32B-AWQ"
    assert awq.params == resolve_model("qwen-32b").params


def test_config_missing_a_field_names_file_and_key() -> None:
    with pytest.raises(UserError) as caught:
        resolve_model(FIXTURES / "missing-hidden-size")
    problem = caught.value.problems[0]
    assert problem.path == "hidden_size"
    assert problem.file is not None and problem.file.endswith("config.json")


def test_config_that_is_not_json_points_at_the_line() -> None:
    with pytest.raises(UserError, match="not valid JSON") as caught:
        resolve_model(FIXTURES / "not-json")
    assert caught.value.problems[0].line is not None


# GPUs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("h100", "H100"),
        ("H100-80G", "H100"),
        ("h100-sxm", "H100"),
        ("NVIDIA H100 80GB", "H100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100-PCIE"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100-80G"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("4090", "RTX4090"),
        ("RTX 4090", "RTX4090"),
        ("H20", "H20-96G"),
        ("h20-141g", "H20-141G"),
        ("h200", "H200"),
        ("a100-80g", "A100-80G"),
        ("A100 40GB", "A100-40G"),
        ("l40s", "L40S"),
        ("b200", "B200"),
    ],
)
def test_resolve_gpu_aliases(name: str, canonical: str) -> None:
    assert resolve_gpu(name).name == canonical


def test_gpu_memory_units() -> None:
    h100 = resolve_gpu("H100")
    # nvidia-smi shows 81559 MiB for an "80 GB" H100: 79.6 GiB, 85.5 decimal GB.
    assert h100.memory_mib == 81559
    assert h100.memory_gib == pytest.approx(79.65, abs=0.01)
    assert h100.memory_gb == pytest.approx(85.52, abs=0.01)


def test_gpu_catalog_facts() -> None:
    gpus = {g.name: g for g in list_gpus()}
    assert {"RTX4090", "L40", "L40S", "A10", "A100-40G", "A100-80G", "H100", "H800"} <= set(gpus)
    assert {"H20-96G", "H20-141G", "H200", "B200"} <= set(gpus)
    assert not gpus["A100-80G"].native_fp8 and not gpus["A10"].native_fp8
    assert all(gpus[n].native_fp8 for n in ("RTX4090", "L40S", "H100", "H20-96G", "B200"))
    assert gpus["H200"].interconnect == "nvlink" and gpus["L40S"].interconnect == "pcie"
    assert all(g.acceptance is None for g in gpus.values())
    assert all(g.bandwidth_gbps > 0 and g.bf16_tflops > 0 for g in gpus.values())


def test_unknown_gpu_suggests_close_names() -> None:
    with pytest.raises(UserError) as caught:
        resolve_gpu("H10")
    assert "did you mean" in caught.value.render() and "'H100'" in caught.value.render()


def test_bare_a100_is_ambiguous() -> None:
    with pytest.raises(UserError, match="ambiguous") as caught:
        resolve_gpu("A100")
    assert "A100-80G" in caught.value.render()
