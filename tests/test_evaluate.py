"""Exact-match accuracy of greedy answers, on a tiny random checkpoint whose own answers are the expected ones."""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from litgpt.generate.base import generate
from litgpt.prompts import Alpaca, save_prompt_style

from litgpt_skip2lora.data.base import InstructData
from litgpt_skip2lora.evaluate import evaluate_accuracy, load_model


@dataclass
class Questions(InstructData):
    """Validation items given as they are: one group each."""

    items: list[dict] = field(default_factory=list)

    def groups(self):
        yield from ([item] for item in self.items)


def test_accuracy_counts_exact_greedy_answers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    save_prompt_style(Alpaca(), checkpoint)
    model, tokenizer = load_model(checkpoint)
    model.max_seq_length = model.config.block_size
    model.set_kv_cache(batch_size=1)
    questions = ["what is the colour of the cat ?", "where did the dog go ?", "what is big ?"]
    answers = []
    for question in questions:  # what the model itself answers greedily, first line, stripped
        prompt = tokenizer.encode(Alpaca().apply(question))
        out = generate(model, prompt, prompt.size(0) + 3, top_k=1, eos_id=tokenizer.eos_id, include_prompt=False)
        answers.append(tokenizer.decode(out).strip().split("\n")[0].strip())
    assert answers[0] and answers[1]
    expected = [answers[0], answers[1] + " mat", answers[2]]  # the second is wrong
    items = [{"instruction": q, "input": "", "output": e} for q, e in zip(questions, expected)]
    data = Questions(items=items + [dict(items[0])], num_train=1, num_val=3, download_dir=tmp_path)
    result = evaluate_accuracy(checkpoint, data, max_new_tokens=3)
    assert result["items"] == 3 and result["accuracy"] == 2 / 3
    assert [a["answer"] for a in result["answers"]] == answers
