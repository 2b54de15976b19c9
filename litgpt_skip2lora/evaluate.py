"""Exact-match accuracy: for a task whose answer is a label, the share of held-out items answered exactly.

Validation loss says how likely the right answer is; a user of a label task wants to know how often greedy
decoding gives it. ``evaluate_accuracy`` generates, greedily, an answer to every validation item of a data module
from a fine-tuned checkpoint (this package's or LitGPT's: both load in this package's ``GPT``) and compares it,
stripped of white space, with the expected output.
"""

import json
from pathlib import Path

import torch
from litgpt.data import DataModule
from litgpt.generate.base import generate
from litgpt.prompts import load_prompt_style
from litgpt.tokenizer import Tokenizer
from tqdm import tqdm

from litgpt_skip2lora.data.base import InstructData
from litgpt_skip2lora.finetune import user_errors
from litgpt_skip2lora.model import GPT, Config


def evaluate_accuracy(
    checkpoint_dir: Path, data: DataModule | None = None, max_new_tokens: int = 8, limit: int | None = None
) -> dict:
    """Greedy answers to the validation items of ``data`` from the model in ``checkpoint_dir``, scored by exact match.

    Args:
        checkpoint_dir: A ``final/`` folder of ``finetune_skip2lora`` or ``finetune_lora``, or a base checkpoint.
        data: The data module whose validation split is scored (its ``val.json`` items: instruction and output),
            e.g. ``litgpt_skip2lora.data.WordNetInstruct`` with ``--data.task supersense``.
        max_new_tokens: The longest answer generated.
        limit: Score only the first ``limit`` items.
    """
    if not isinstance(data, InstructData):
        with user_errors():
            raise ValueError("--data must be a data module built offline with a val.json, e.g. WordNetInstruct.")
    model, tokenizer = load_model(checkpoint_dir)
    style = load_prompt_style(checkpoint_dir)
    data.prepare_data()
    items = json.loads((data.split_dir / "val.json").read_text())[:limit]
    correct, answers = 0, []
    model.max_seq_length = min(512, model.config.block_size)
    model.set_kv_cache(batch_size=1)
    for item in tqdm(items, desc=f"Accuracy of {checkpoint_dir}"):
        prompt = tokenizer.encode(style.apply(item["instruction"]))
        out = generate(
            model, prompt, prompt.size(0) + max_new_tokens, top_k=1, eos_id=tokenizer.eos_id, include_prompt=False
        )
        answer = tokenizer.decode(out).strip().split("\n")[0].strip()
        correct += answer == item["output"].strip()
        answers.append({"expected": item["output"], "answer": answer})
    result = {"accuracy": correct / len(items), "items": len(items), "answers": answers}
    print(f"Exact-match accuracy: {correct}/{len(items)} = {result['accuracy']:.3f}")
    return result


def load_model(checkpoint_dir: Path) -> tuple[GPT, Tokenizer]:
    """The checkpoint's model; only LoRA weights that a merged checkpoint no longer holds may be missing."""
    model = GPT(Config.from_file(checkpoint_dir / "model_config.yaml"))
    state = torch.load(checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True)
    missing = model.load_state_dict(state.get("model", state), strict=False).missing_keys
    if any("lora_" not in key for key in missing):
        raise ValueError(f"{checkpoint_dir / 'lit_model.pth'} lacks weights of its model: {missing[:5]} ...")
    return model.eval(), Tokenizer(checkpoint_dir)
