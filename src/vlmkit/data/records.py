"""Helpers over the record fields of DESIGN.md's data contract that several families read.

A record is `{"image", "texts", ...}` with optional `qa` (`[{question, answer | answers, type}]`),
`statements` (`[{text, label}]`) and `objects` (`[{name, box}]`).
"""
from __future__ import annotations

from typing import Sequence


def answers_of(item: dict) -> list[str]:
    """The human answers of one `qa` entry: its `answers` list (VQA v2) or its single `answer`."""
    answers = item.get("answers")
    if answers:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    return [str(item["answer"])]


def record_texts(records: Sequence[dict], questions: bool = True, statements: bool = False) -> list[str]:
    """Captions, plus questions and answers (and statements) of the records: a tokenizer corpus."""
    texts = []
    for record in records:
        texts.extend(record.get("texts") or [])
        if questions:
            for item in record.get("qa") or []:
                texts.append(item["question"])
                texts.extend(answers_of(item))
        if statements:
            texts.extend(item["text"] for item in record.get("statements") or [])
    return texts


def qa_text(question: str, answer: str | None = None) -> str:
    """A question (and its answer) written as plain text, the form a language model learns VQA from
    and is prompted with: "Question: {question} Answer: {answer}" (no answer: ends at "Answer:")."""
    prompt = f"Question: {question.strip()} Answer:"
    return prompt if answer is None else f"{prompt} {answer.strip()}"
