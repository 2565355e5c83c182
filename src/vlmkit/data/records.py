"""Helpers over the record fields of DESIGN.md's data contract that several families read (no torch).

A record is `{"image", "texts", ...}` with optional `qa` (`[{question, answer | answers, type}]`), `conversations`
(LLaVA's `[{from, value}]`, checked by `check_messages`),
`statements` (`[{text, label}]`) and `objects` (`[{name, box}]`).
"""
from __future__ import annotations

from typing import Any, Sequence

from vlmkit.errors import UserError

# LLaVA's `from` values, and the chat-API names for the same two speakers.
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def answers_of(item: dict) -> list[str]:
    """The human answers of one `qa` entry: its `answers` list (VQA v2) or its single `answer`."""
    answers = item.get("answers")
    if answers:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    return [str(item["answer"])]


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQA v2 soft targets: min(1, count / 3) per normalised answer (1.0 when there is one answer)."""
    from collections import Counter

    from vlmkit.metrics.vqa import normalize_answer

    counts = Counter(normalize_answer(answer) for answer in answers)
    if len(answers) == 1:
        return {answer: 1.0 for answer in counts}
    return {answer: min(1.0, count / 3.0) for answer, count in counts.items()}


def answer_vocabulary(records: Sequence[dict], limit: int) -> list[str]:
    """The `limit` most frequent normalised answers of the records' `qa` (ties alphabetical): the classes
    of a VQA classifier (VQA v2 keeps 3,129). Empty when no record has questions."""
    from collections import Counter

    from vlmkit.metrics.vqa import normalize_answer

    counts = Counter(normalize_answer(a) for record in records for item in record.get("qa") or [] for a in answers_of(item))
    return [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


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


def check_messages(messages: Any, where: str = "conversation", prompt: bool = False) -> list[tuple[str, str]]:
    """Validate a conversation and return its turns as `(role, text)` with role "human" or "gpt".

    A turn is `{"from": ..., "value": ...}` (LLaVA; `{"role", "content"}` is accepted too) with
    role human/user or gpt/assistant. Turns must alternate starting with a human turn and end
    with an assistant turn (for `prompt=True`, an inference prompt, with a human turn). Anything
    else raises a UserError naming `where` (the record).
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where} has no conversation turns; give \"conversations\": [{{\"from\": \"human\", \"value\": ...}}, "
                        f"{{\"from\": \"gpt\", \"value\": ...}}]")
    turns = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where} turn {number} is not an object; write {{\"from\": \"human\" | \"gpt\", \"value\": \"...\"}}")
        role, value = message.get("from", message.get("role")), message.get("value", message.get("content"))
        if role not in ROLES:
            raise UserError(f"{where} turn {number} is from {role!r}; turns are from 'human' (or 'user') or 'gpt' (or 'assistant')")
        if not isinstance(value, str):
            raise UserError(f"{where} turn {number} has no text \"value\"; give each turn \"value\": \"...\"")
        expected = "human" if number % 2 == 0 else "gpt"
        if ROLES[role] != expected:
            raise UserError(f"{where} turn {number} is a {ROLES[role]} turn where a {expected} turn belongs; turns must "
                            f"alternate human, gpt, human, ... starting with the human")
        turns.append((expected, value))
    if prompt and turns[-1][0] != "human":
        raise UserError(f"{where} ends with an assistant turn; a prompt ends with the human turn to answer")
    if not prompt and turns[-1][0] != "gpt":
        raise UserError(f"{where} has no assistant turn after its last human turn; end the conversation with a "
                        f"'gpt' answer (there is nothing to learn from an unanswered question)")
    return turns
