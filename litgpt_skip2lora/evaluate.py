"""How often a fine-tuned model gives the right answer on the validation items of any LitGPT data module, prompted
as training was: **exact match** (the greedy answer's first line equals the expected output) and, when the answers
form a closed set of labels, **label likelihood** (the label whose tokens, end-of-text included, are likeliest after
the prompt, as lm-eval-harness scores multiple choice: a malformed generation cannot lose an item).
"""

import json
from collections import Counter
from pathlib import Path

import torch
from litgpt.data import DataModule
from litgpt.generate.base import generate
from litgpt.tokenizer import Tokenizer
from tqdm import tqdm

from litgpt_skip2lora.checks import refuse
from litgpt_skip2lora.model import GPT, Config

CLOSED_SET_REPEATS = 10  # training answers form a closed set when each distinct one occurs this often on average


def evaluate_accuracy(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    labels: list[str] | None = None,
    max_new_tokens: int = 8,
    limit: int | None = None,
    out_file: Path | None = None,
) -> dict:
    """Score the model in ``checkpoint_dir`` on the validation items of ``data``.

    Args:
        checkpoint_dir: A ``final/`` folder of ``finetune_skip2lora`` or ``finetune_lora``, or a base checkpoint.
        data: The LitGPT data module whose validation split is scored, with its prompt style, e.g. ``JSON``.
        labels: The closed set of answers; default: the training answers, when they form one; ``[]``: none.
        max_new_tokens: The longest greedy answer.
        limit: Score only the first ``limit`` items.
        out_file: The per-item answers as JSON; default ``evaluate_accuracy.json`` in ``checkpoint_dir``, replaced.
    """
    if data is None:
        refuse(ValueError("--data is required: the data module whose validation split is scored, e.g. --data JSON."))
    model, tokenizer = load_model(checkpoint_dir)
    train_items, items = splits(data, tokenizer)
    items = items[:limit]
    labels = closed_set(train_items) if labels is None else labels
    prompts = [encoded_prompt(tokenizer, data, item) for item in items]
    encoded = label_tokens(tokenizer, labels)
    answer_width = max([max_new_tokens, *(a.size(0) for a in encoded.values())])
    # the KV cache as long as the longest item needs, one row for greedy generation and one a label for scoring
    model.max_seq_length = min(max((p.size(0) for p in prompts), default=0) + answer_width, model.config.block_size)
    model.set_kv_cache(batch_size=max(1, len(labels)))
    scored = tqdm(zip(items, prompts), total=len(items), desc="Scoring")
    results = [score(model, tokenizer, item, prompt, encoded, max_new_tokens) for item, prompt in scored]
    report = summary(results, labels)
    out_file = out_file or Path(checkpoint_dir) / "evaluate_accuracy.json"
    out_file.write_text(json.dumps({**report, "items": results}, indent=1) + "\n", encoding="utf-8")
    print(f"Exact match: {report['exact_match']}/{report['count']}")
    if labels:
        print(f"Label likelihood: {report['label_match']}/{report['count']} ({len(labels)} labels)")
        for confusion in report["confusions"][:5]:
            print(f"  {confusion['expected']} -> {confusion['chosen']}: {confusion['count']}")
    print(f"Per-item answers: {out_file}")
    return report


def load_model(checkpoint_dir: Path) -> tuple[GPT, Tokenizer]:
    """The checkpoint's model; only LoRA weights that a merged checkpoint no longer holds may be missing."""
    model = GPT(Config.from_file(checkpoint_dir / "model_config.yaml"))
    state = torch.load(checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True)
    missing = model.load_state_dict(state.get("model", state), strict=False).missing_keys
    if any("lora_" not in key for key in missing):
        raise ValueError(f"{checkpoint_dir / 'lit_model.pth'} lacks weights of its model: {missing[:5]} ...")
    return model.eval(), Tokenizer(checkpoint_dir)


def splits(data: DataModule, tokenizer: Tokenizer) -> tuple[list[dict], list[dict]]:
    """The data module's training and validation items (instruction, input, output)."""
    data.connect(tokenizer=tokenizer, batch_size=1, max_seq_length=None)
    data.prepare_data()
    data.setup()
    return list(data.train_dataset.data), list(data.test_dataset.data)  # LitGPT's SFT modules' names


def closed_set(items: list[dict]) -> list[str]:
    """The distinct answers of ``items`` when they form a closed set of labels, else none."""
    answers = sorted({item["output"].strip() for item in items})
    return answers if len(answers) * CLOSED_SET_REPEATS <= len(items) else []


def encoded_prompt(tokenizer: Tokenizer, data: DataModule, item: dict, device: torch.device | None = None):
    """``item``'s prompt in the data's prompt style, as training saw it, encoded."""
    return tokenizer.encode(data.prompt_style.apply(prompt=item["instruction"], **item), device=device)


def label_tokens(tokenizer: Tokenizer, labels: list[str]) -> dict[str, torch.Tensor]:
    """Each label's tokens as training encodes an answer, the end-of-text token included."""
    return {label: tokenizer.encode(label, bos=False, eos=True) for label in labels}


@torch.no_grad()
def score(
    model: GPT, tokenizer: Tokenizer, item: dict, prompt: torch.Tensor, labels: dict[str, torch.Tensor], max_new: int
) -> dict:
    """``item``'s greedy answer and, with ``labels`` (:func:`label_tokens`), its likeliest label."""
    out = generate(model, prompt, prompt.size(0) + max_new, top_k=1, eos_id=tokenizer.eos_id, include_prompt=False)
    answer = tokenizer.decode(out).strip().split("\n")[0].strip()
    expected = item["output"].strip()
    result = {"instruction": item["instruction"], "expected": expected, "answer": answer, "exact": answer == expected}
    if labels:
        chosen = likeliest(model, prompt, labels)
        result.update(chosen=chosen, label_correct=chosen == expected)
    return result


def likeliest(model: GPT, prompt: torch.Tensor, labels: dict[str, torch.Tensor]) -> str:
    """The label whose tokens are likeliest after ``prompt``."""
    return list(labels)[int(label_log_likelihoods(model, prompt, list(labels.values())).argmax())]


def label_log_likelihoods(model: GPT, prompt: torch.Tensor, answers: list[torch.Tensor]) -> torch.Tensor:
    """Each label's summed log-probability after ``prompt``: the prompt runs once, on row 0 of the KV cache, copied
    to every other row, then all labels' tokens (``answers``) run as one batch, one label a row."""
    n, width = prompt.size(0), max(a.size(0) for a in answers)
    device = prompt.device
    prompt_logits = model(prompt[None], input_pos=torch.arange(n, device=device), input_pos_maxp1=n)[0, -1]
    for cache in (m.kv_cache for m in model.modules() if getattr(m, "kv_cache", None) is not None):
        cache.k[1:, :, :n] = cache.k[:1, :, :n]
        cache.v[1:, :, :n] = cache.v[:1, :, :n]
    batch = torch.zeros(len(answers), width, dtype=torch.long, device=device)
    for row, answer in enumerate(answers):
        batch[row, : answer.size(0)] = answer
    positions = torch.arange(n, n + width, device=device)
    logits = model(batch, input_pos=positions, input_pos_maxp1=n + width)  # position i predicts label token i + 1
    logits = torch.cat([prompt_logits.expand(len(answers), 1, -1), logits[:, :-1]], dim=1).float()
    log_probs = logits.log_softmax(-1).gather(-1, batch[..., None])[..., 0]
    lengths = torch.tensor([a.size(0) for a in answers], device=device)
    return (log_probs * (torch.arange(width, device=device) < lengths[:, None])).sum(-1)


@torch.no_grad()
def label_accuracy(model: GPT, tokenizer: Tokenizer, data: DataModule, items: list[dict], labels: list[str]) -> float:
    """The fraction of ``items`` whose expected answer is the likeliest label (``model`` left in evaluation mode)."""
    device = model.lm_head.linear.weight.device
    model.eval()
    model.set_kv_cache(batch_size=len(labels), device=device)
    encoded = {label: tokens.to(device) for label, tokens in label_tokens(tokenizer, labels).items()}
    correct = 0
    for item in tqdm(items, desc="Label accuracy", leave=False):
        correct += likeliest(model, encoded_prompt(tokenizer, data, item, device), encoded) == item["output"].strip()
    model.clear_kv_cache()
    return correct / max(1, len(items))


def summary(results: list[dict], labels: list[str]) -> dict:
    """Counts, and for labels the most common confusions (expected, chosen)."""
    report = {"count": len(results), "exact_match": sum(r["exact"] for r in results), "labels": labels}
    if labels:
        report["label_match"] = sum(r["label_correct"] for r in results)
        wrong = Counter((r["expected"], r["chosen"]) for r in results if not r["label_correct"])
        report["confusions"] = [{"expected": e, "chosen": c, "count": n} for (e, c), n in wrong.most_common()]
    return report
