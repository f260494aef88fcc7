"""The models deepfleet serves, described by the architecture facts that decide their memory.

Every catalog entry is built from a subset of the model's published Hugging Face ``config.json``
by the same parser that reads a local model directory, so a catalog entry and a downloaded copy
of the same model can never disagree. Parameter counts are derived from the architecture
(embeddings + attention + MLP/MoE experts per layer), not copied from model cards.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from infra.errors import Problem, UserError

ModelKind = Literal["moe-mla", "dense", "encoder"]
WeightDtype = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]

WEIGHT_DTYPES: tuple[WeightDtype, ...] = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class ModelArch:
    """What sizing needs to know about a model; all counts are exact, from config.json."""

    hf_id: str
    kind: ModelKind
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: WeightDtype
    """Dtype the weights occupy in GPU memory when served as published."""
    params: int
    """All weights the engine loads (the MTP/NextN draft layer of V3/R1 is not counted)."""
    embedding_params: int
    """Input embeddings and LM head: they stay 16-bit inside FP8/INT8/INT4 checkpoints."""
    replicated_params: int = 0
    """Weights every tensor-parallel rank holds whole (MLA down-projections, MoE routers)."""
    active_params: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    fp8_block_size: int | None = None
    aliases: tuple[str, ...] = ()
    source: str = "catalog"

    @property
    def name(self) -> str:
        return self.hf_id.rsplit("/", 1)[-1]

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_embedding(self) -> bool:
        return self.kind == "encoder"

    def kv_elements_per_token_per_gpu(self, tp: int) -> int:
        """Cache elements one GPU stores per token, over all layers, at tensor parallelism tp.

        MLA caches one compressed latent per layer shared by all heads, and every TP rank keeps
        the whole latent because each rank's heads need all of it. GQA shards KV heads over the
        ranks; with more ranks than KV heads the engine replicates heads so each rank has one.
        """
        if self.kind == "encoder":
            return 0
        if self.kv_lora_rank is not None:
            return self.num_layers * (self.kv_lora_rank + (self.qk_rope_head_dim or 0))
        heads_per_gpu = max(1, self.num_kv_heads // tp)
        return self.num_layers * 2 * heads_per_gpu * self.head_dim


def _require(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(
            "config.json lacks an architecture field sizing needs",
            [
                Problem(
                    f"expected a positive integer, found {value!r}",
                    file=where,
                    path=key,
                    hint="use the config.json published with the model, unmodified",
                )
            ],
        )
    return value


def _weight_dtype(config: Mapping[str, Any], where: str) -> WeightDtype:
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping):
        return _quantized_dtype(quant, where)
    raw = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").lower()
    if raw in ("bfloat16", "bf16"):
        return "bf16"
    if raw in ("float16", "fp16", "half"):
        return "fp16"
    if raw in ("float32", "fp32", "float"):
        # Engines serve float32 checkpoints in 16 bits (SGLang's dtype "auto" downcasts),
        # so the weights occupy 2 bytes per parameter on the GPU.
        return "bf16"
    raise UserError(
        "config.json names a dtype deepfleet cannot size",
        [Problem(f"unknown dtype {raw!r}", file=where, path="torch_dtype")],
    )


def _quantized_dtype(quant: Mapping[str, Any], where: str) -> WeightDtype:
    method = str(quant.get("quant_method", "")).lower()
    bits = quant.get("bits") or quant.get("w_bit") or quant.get("weight_bits")
    if method in ("fp8", "w8a8_fp8") or method.startswith("fbgemm_fp8"):
        return "fp8"
    if "int8" in method:
        return "int8"
    if method in ("w4afp8", "w4a8", "moe_wna16") or "int4" in method:
        return "int4"
    if method == "bitsandbytes":
        return "int4" if quant.get("load_in_4bit") else "int8"
    if method == "compressed-tensors":
        bits = _compressed_tensors_bits(quant)
    if method in ("awq", "gptq", "compressed-tensors", "marlin", "gptq_marlin", "awq_marlin"):
        if bits == 4:
            return "int4"
        if bits == 8:
            return "int8"
    raise UserError(
        "config.json names a quantization deepfleet cannot size",
        [
            Problem(
                f"quant_method {method!r} with bits {bits!r}",
                file=where,
                path="quantization_config",
                hint="supported: fp8, w8a8_int8, awq/gptq/compressed-tensors with 4 or 8 bits",
            )
        ],
    )


def _compressed_tensors_bits(quant: Mapping[str, Any]) -> int | None:
    groups = quant.get("config_groups")
    if isinstance(groups, Mapping):
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, Mapping) else None
            if isinstance(weights, Mapping) and isinstance(weights.get("num_bits"), int):
                if weights.get("type") == "float":
                    return None
                return cast(int, weights["num_bits"])
    return None


def _fp8_block(config: Mapping[str, Any]) -> int | None:
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping):
        block = quant.get("weight_block_size")
        if isinstance(block, list) and block and isinstance(block[0], int):
            return block[0]
    return None


def arch_from_config(
    config: Mapping[str, Any],
    hf_id: str,
    *,
    aliases: Iterable[str] = (),
    source: str = "catalog",
) -> ModelArch:
    """Build a ModelArch from a Hugging Face config.json mapping."""
    where = source if source != "catalog" else f"{hf_id}/config.json"
    model_type = str(config.get("model_type", "")).lower()
    common: dict[str, Any] = {
        "hf_id": hf_id,
        "dtype": _weight_dtype(config, where),
        "aliases": tuple(aliases),
        "source": source,
    }
    if "kv_lora_rank" in config:
        return _mla_moe(config, where, common)
    if model_type in ("xlm-roberta", "roberta", "bert"):
        return _encoder(config, where, common)
    return _dense_decoder(config, where, common, model_type)


def _dense_decoder(
    config: Mapping[str, Any], where: str, common: dict[str, Any], model_type: str
) -> ModelArch:
    hidden = _require(config, "hidden_size", where)
    layers = _require(config, "num_hidden_layers", where)
    heads = _require(config, "num_attention_heads", where)
    inter = _require(config, "intermediate_size", where)
    vocab = _require(config, "vocab_size", where)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    # Qwen2 hard-codes biases on q/k/v without saying so in config.json.
    qkv_bias = bool(config.get("attention_bias", model_type == "qwen2"))
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    if qkv_bias:
        attention += heads * head_dim + 2 * kv_heads * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = config.get("num_parameters") or layers * per_layer + embeddings + hidden
    return ModelArch(
        kind="dense",
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_context=int(config.get("max_position_embeddings") or 4096),
        params=int(params),
        embedding_params=embeddings,
        active_params=int(params),
        fp8_block_size=_fp8_block(config),
        **common,
    )


def _mla_moe(config: Mapping[str, Any], where: str, common: dict[str, Any]) -> ModelArch:
    hidden = _require(config, "hidden_size", where)
    layers = _require(config, "num_hidden_layers", where)
    heads = _require(config, "num_attention_heads", where)
    inter = _require(config, "intermediate_size", where)
    vocab = _require(config, "vocab_size", where)
    kv_rank = _require(config, "kv_lora_rank", where)
    rope = _require(config, "qk_rope_head_dim", where)
    nope = _require(config, "qk_nope_head_dim", where)
    v_dim = _require(config, "v_head_dim", where)
    q_rank = config.get("q_lora_rank")

    if q_rank:
        q_down = hidden * q_rank + q_rank
        q_up = q_rank * heads * (nope + rope)
    else:
        q_down, q_up = 0, hidden * heads * (nope + rope)
    kv_down = hidden * (kv_rank + rope) + kv_rank
    kv_up = kv_rank * heads * (nope + v_dim)
    attention = q_down + q_up + kv_down + kv_up + heads * v_dim * hidden + 2 * hidden

    experts = config.get("n_routed_experts")
    dense_layers = layers
    moe_layer = active_moe_layer = router = 0
    moe_inter = config.get("moe_intermediate_size")
    topk = config.get("num_experts_per_tok")
    if experts:
        moe_inter = _require(config, "moe_intermediate_size", where)
        topk = _require(config, "num_experts_per_tok", where)
        shared = int(config.get("n_shared_experts") or 0)
        expert = 3 * hidden * moe_inter
        # The router gate, plus the per-expert score bias of aux-loss-free routing (V3/R1).
        router = experts * hidden + (experts if config.get("topk_method") == "noaux_tc" else 0)
        moe_layer = (experts + shared) * expert + router
        active_moe_layer = (topk + shared) * expert + router
        dense_layers = min(layers, int(config.get("first_k_dense_replace") or 0))
    moe_layers = layers - dense_layers
    dense_mlp = 3 * hidden * inter

    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    body = layers * attention + dense_layers * dense_mlp + hidden + embeddings
    params = config.get("num_parameters") or body + moe_layers * moe_layer
    # SGLang keeps MLA's low-rank down-projections and the MoE routers whole on every rank.
    replicated = layers * (q_down + kv_down) + moe_layers * router
    return ModelArch(
        kind="moe-mla",
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=nope + rope,
        vocab_size=vocab,
        max_context=int(config.get("max_position_embeddings") or 4096),
        params=int(params),
        embedding_params=embeddings,
        replicated_params=replicated,
        active_params=body + moe_layers * active_moe_layer,
        kv_lora_rank=kv_rank,
        qk_rope_head_dim=rope,
        n_routed_experts=experts or None,
        num_experts_per_tok=topk if experts else None,
        moe_intermediate_size=moe_inter if experts else None,
        fp8_block_size=_fp8_block(config),
        **common,
    )


def _encoder(config: Mapping[str, Any], where: str, common: dict[str, Any]) -> ModelArch:
    hidden = _require(config, "hidden_size", where)
    layers = _require(config, "num_hidden_layers", where)
    heads = _require(config, "num_attention_heads", where)
    inter = _require(config, "intermediate_size", where)
    vocab = _require(config, "vocab_size", where)
    positions = int(config.get("max_position_embeddings") or 512)
    token_types = int(config.get("type_vocab_size") or 1)
    embeddings = (vocab + positions + token_types) * hidden + 2 * hidden
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden
    pooler = hidden * hidden + hidden
    params = config.get("num_parameters") or embeddings + layers * per_layer + pooler
    # RoBERTa-style position ids start after the padding index, so two positions are unusable.
    offset = 2 if "roberta" in str(config.get("model_type", "")) else 0
    return ModelArch(
        kind="encoder",
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_context=positions - offset,
        params=int(params),
        embedding_params=vocab * hidden,
        active_params=int(params),
        **common,
    )


# config.json subsets as published on Hugging Face (only the fields sizing reads).
_V3_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "topk_method": "noaux_tc",
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }


_BGE_M3_CONFIG: dict[str, Any] = {
    "model_type": "xlm-roberta",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "vocab_size": 250002,
    "max_position_embeddings": 8194,
    "type_vocab_size": 1,
    "torch_dtype": "float32",
}


def _distill_aliases(base: str, size: str) -> tuple[str, ...]:
    return (
        f"r1-distill-{base}-{size}",
        f"{base}-{size}",
        f"deepseek-r1-distill-{base}-{size}",
        f"deepseek-r1:{size}",
    )


_CATALOG_SOURCES: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("deepseek-ai/DeepSeek-R1", ("r1", "deepseek-r1", "deepseek-r1:671b"), _V3_CONFIG),
    ("deepseek-ai/DeepSeek-R1-0528", ("r1-0528", "deepseek-r1-0528"), _V3_CONFIG),
    ("deepseek-ai/DeepSeek-V3", ("v3", "deepseek-v3"), _V3_CONFIG),
    ("deepseek-ai/DeepSeek-V3-0324", ("v3-0324", "deepseek-v3-0324"), _V3_CONFIG),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        _distill_aliases("qwen", "1.5b"),
        _qwen2(1536, 8960, 28, 12, 2, 151936),
    ),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        _distill_aliases("qwen", "7b"),
        _qwen2(3584, 18944, 28, 28, 4, 152064),
    ),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        _distill_aliases("qwen", "14b"),
        _qwen2(5120, 13824, 48, 40, 8, 152064),
    ),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        _distill_aliases("qwen", "32b"),
        _qwen2(5120, 27648, 64, 40, 8, 152064),
    ),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        _distill_aliases("llama", "8b"),
        _llama(4096, 14336, 32, 32, 8),
    ),
    (
        "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        _distill_aliases("llama", "70b"),
        _llama(8192, 28672, 80, 64, 8),
    ),
    ("BAAI/bge-m3", ("bge-m3", "bge"), _BGE_M3_CONFIG),
)

CATALOG: tuple[ModelArch, ...] = tuple(
    arch_from_config(config, hf_id, aliases=aliases) for hf_id, aliases, config in _CATALOG_SOURCES
)


def _key(name: str) -> str:
    return name.strip().lower()


def _index() -> dict[str, ModelArch]:
    index: dict[str, ModelArch] = {}
    for model in CATALOG:
        for name in (model.hf_id, model.name, *model.aliases):
            index.setdefault(_key(name), model)
    return index


_INDEX = _index()


def list_models() -> tuple[ModelArch, ...]:
    return CATALOG


def load_model_dir(path: str | os.PathLike[str]) -> ModelArch:
    """Read a local model directory (or its config.json) the way an engine would."""
    target = Path(path).expanduser()
    config_path = target / "config.json" if target.is_dir() else target
    if not config_path.is_file():
        raise UserError(
            "no config.json in the model directory",
            [
                Problem(
                    f"{config_path} does not exist",
                    hint="point --model at the directory holding the model's config.json",
                )
            ],
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(
            "config.json is not valid JSON",
            [Problem(error.msg, file=str(config_path), line=error.lineno, column=error.colno)],
        ) from error
    if not isinstance(config, dict):
        raise UserError(
            "config.json is not a JSON object",
            [Problem("expected {...} at the top level", file=str(config_path))],
        )
    name = str(config.get("_name_or_path") or config_path.parent.name)
    return arch_from_config(config, name, source=str(config_path))


def _looks_like_path(name: str) -> bool:
    # "org/name" is a Hugging Face id; anything rooted or deeper is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") >= 2


def resolve_model(name_or_path: str | os.PathLike[str]) -> ModelArch:
    """Find a model by HF id (any case), alias, or local directory holding config.json."""
    text = os.fspath(name_or_path)
    found = _INDEX.get(_key(text))
    if found is not None:
        return found
    if Path(text).expanduser().exists() or _looks_like_path(text):
        return load_model_dir(text)
    suggestions = difflib.get_close_matches(_key(text), list(_INDEX), n=3, cutoff=0.5)
    hint = (
        f"did you mean {', '.join(repr(s) for s in suggestions)}?"
        if suggestions
        else "known models: " + ", ".join(m.hf_id for m in CATALOG)
    )
    raise UserError(
        "unknown model",
        [
            Problem(
                f"{text!r} is neither a known model nor a directory with config.json",
                hint=hint,
            )
        ],
    )
