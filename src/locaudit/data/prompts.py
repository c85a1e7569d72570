"""Prompt formats: how a question (and an answer) become model text.

`plain`:  "Q: {question}\\nA:" and the answer as " {answer}" (TruthfulQA's and ITI's format).
`chat`:   the tokenizer's chat template with the question as the user turn; the answer is the assistant turn.
A completion is always scored/generated as the text that directly follows `prompt(question)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from locaudit.errors import ConfigError

FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "plain"
    system: str | None = None  # chat only: a system message; None keeps the template's default

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ConfigError(f"prompt format {self.kind!r} is not one of {FORMATS}")

    def prompt(self, question: str, tokenizer=None) -> str:
        """The text before the answer."""
        if self.kind == "plain":
            return f"Q: {question}\nA:"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt format 'chat' needs a tokenizer with a chat template; use --format plain")
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def completion(self, answer: str) -> str:
        """The answer as it follows the prompt."""
        return f" {answer}" if self.kind == "plain" else answer

    def full(self, question: str, answer: str, tokenizer=None) -> str:
        return self.prompt(question, tokenizer) + self.completion(answer)

    def stop_strings(self, tokenizer=None) -> list[str]:
        """Where generation should stop: the end of the answer's line (plain: "Q: ...\nA: ...", one line
        per answer, as TruthfulQA's QA format; otherwise small models go on with "B: ..." lines) or the
        chat end token."""
        if self.kind == "plain":
            return ["\n"]
        eos = getattr(tokenizer, "eos_token", None)
        return [eos] if eos else []
