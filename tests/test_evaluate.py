"""evaluate_accuracy on a tiny random checkpoint: exact match on any data module, and label likelihood."""

import json
import shutil
from pathlib import Path

import torch
from litgpt.data import JSON
from litgpt.generate.base import generate
from litgpt.prompts import Alpaca

import benchmarks.evaluate_accuracy as evaluate_benchmark
from litgpt_skip2lora.data import WordNetInstruct
from litgpt_skip2lora.evaluate import evaluate_accuracy, load_model

QUESTIONS = ["what is the colour of the cat ?", "where did the dog go ?", "what is big ?", "the cat sat on the mat"]


def write_split(directory: Path, train: list[dict], val: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.json").write_text(json.dumps(train))
    (directory / "val.json").write_text(json.dumps(val))
    return directory


def test_json_data_scores_what_wordnet_scores(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The same validation items through LitGPT's JSON module and through WordNetInstruct: the same answers."""
    wordnet = WordNetInstruct(num_train=30, num_val=6, splits_dir=tmp_path / "wordnet", num_workers=0)
    wordnet.prepare_data()
    as_json = JSON(wordnet.split_dir, prompt_style=wordnet.prompt_style, num_workers=0)
    first = evaluate_accuracy(tiny_checkpoint, wordnet, max_new_tokens=3, out_file=tmp_path / "wordnet.json")
    second = evaluate_accuracy(tiny_checkpoint, as_json, max_new_tokens=3, out_file=tmp_path / "json.json")
    assert first["count"] == second["count"] == 6
    answers = [json.loads((tmp_path / f"{name}.json").read_text())["items"] for name in ("wordnet", "json")]
    assert answers[0] == answers[1] and first["exact_match"] == second["exact_match"]


def test_exact_match_counts_only_the_exact_answer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_checkpoint)
    model.max_seq_length = model.config.block_size
    model.set_kv_cache(batch_size=1)
    greedy = []
    for question in QUESTIONS[:2]:  # the model's own greedy answer, from LitGPT's generate
        prompt = tokenizer.encode(Alpaca().apply(question))
        out = generate(model, prompt, prompt.size(0) + 3, top_k=1, eos_id=tokenizer.eos_id, include_prompt=False)
        greedy.append(tokenizer.decode(out).strip().split("\n")[0].strip())
    assert all(greedy)
    val = [
        {"instruction": QUESTIONS[0], "input": "", "output": greedy[0]},
        {"instruction": QUESTIONS[1], "input": "", "output": greedy[1] + " mat"},  # one word more: wrong
    ]
    data = JSON(write_split(tmp_path / "data", val, val), num_workers=0)
    result = evaluate_accuracy(tiny_checkpoint, data, max_new_tokens=3, out_file=tmp_path / "out.json")
    assert (result["count"], result["exact_match"]) == (2, 1)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [item["answer"] for item in saved["items"]] == greedy and saved["exact_match"] == 1


def test_label_likelihood_scores_the_label_greedy_decoding_garbles(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Labels of two words, answers of one token: greedy decoding can never match a label, and label likelihood
    picks the label the model finds most likely (computed here, independently, with a plain forward pass)."""
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    model, tokenizer = load_model(checkpoint)
    model.max_seq_length = model.config.block_size
    labels = ["red cat", "blue dog", "big mat", "small log"]

    def likeliest(question: str) -> str:
        prompt = tokenizer.encode(Alpaca().apply(question))
        scores = []
        for label in labels:
            answer = tokenizer.encode(label, bos=False, eos=True)
            log_probs = model(torch.cat([prompt, answer])[None])[0].log_softmax(-1)
            scores.append(sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(answer.tolist())))
        return labels[int(torch.stack(scores).argmax())]

    val = [{"instruction": q, "input": "", "output": likeliest(q)} for q in QUESTIONS]
    train = [{"instruction": "x", "input": "", "output": label} for label in labels for _ in range(10)]
    data = JSON(write_split(tmp_path / "data", train, val), num_workers=0)
    result = evaluate_accuracy(checkpoint, data, max_new_tokens=1, out_file=tmp_path / "out.json")
    assert result["labels"] == sorted(labels)  # 4 distinct answers among 40 training items: a closed set
    assert (result["exact_match"], result["label_match"], result["count"]) == (0, 4, 4)
    assert result["confusions"] == []

    wrong = [dict(item, output=labels[(labels.index(item["output"]) + 1) % 4]) for item in val]
    data = JSON(write_split(tmp_path / "wrong", train, wrong), num_workers=0)
    result = evaluate_accuracy(checkpoint, data, labels=labels, max_new_tokens=1, out_file=tmp_path / "out.json")
    assert result["label_match"] == 0 and sum(c["count"] for c in result["confusions"]) == 4


def test_the_timing_benchmark_times_whole_runs_and_keeps_their_counts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    val = [{"instruction": q, "input": "", "output": "red"} for q in QUESTIONS]
    data = write_split(tmp_path / "data", val, val)
    options = ["--checkpoint", str(tiny_checkpoint), "--items", "3", "--rounds", "1", "--work", str(tmp_path / "work")]
    options += ["--out", str(tmp_path), "--data", "--data", "JSON", "--data.json_path", str(data)]
    results = json.loads(evaluate_benchmark.main(options).read_text())
    (tree,) = results["trees"]
    (only,) = tree["runs"]
    assert (only["count"], results["items"]) == (3, 3) and only["seconds"] > 0
    assert tree["median_seconds_per_item"] == only["seconds"] / 3
