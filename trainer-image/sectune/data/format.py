"""Prompt formatting through the model's chat template, and label-only loss masks.

Every example becomes (prompt ids, target ids): the prompt is the system prompt plus the user
message rendered from the task template; the target is what the assistant says (the label text
for classification) including the template's end-of-turn tokens. Loss is computed on target
tokens only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from sectune.config import JobSpec
from sectune.data.example import Example

IGNORE = -100


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def user_message(example: Example, spec: JobSpec) -> str:
    """The user turn: the task template filled from the example's prompt fields."""
    if spec.dataset.format == "instruction" and spec.task.template == "{text}":
        instruction, given = example.fields.get("instruction", ""), example.fields.get("input", "")
        return f"{instruction}\n\n{given}".strip()
    return spec.task.template.format_map(_Fields(example.fields))


WORD_JOINER = "\u2060"
"""Invisible, and never part of a tokenizer's control-token strings."""


def control_strings(tokenizer: Any) -> list[str]:
    """Every string the tokenizer turns into one added token wherever it appears in text: its
    special tokens and the other added tokens (chat markup such as `<|im_start|>`,
    `<|start_header_id|>`, reserved tokens), longest first."""
    found = {
        str(token.content if hasattr(token, "content") else token)
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
    }
    found.update(getattr(tokenizer, "all_special_tokens", []))
    return sorted((s for s in found if s), key=len, reverse=True)


class PlainText:
    """Makes untrusted text (a log line, a rule, a training row, a request) plain for one
    tokenizer: every control-token string is broken by a word joiner after its first
    character, so it is tokenized as the characters it shows and can never open or close a
    turn. Nothing else changes. Built once per tokenizer (`plain_text_for`)."""

    def __init__(self, tokenizer: Any) -> None:
        controls = control_strings(tokenizer)
        self.pattern = re.compile("|".join(re.escape(c) for c in controls)) if controls else None

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation with every message's content made plain."""
        return [{**m, "content": self(m["content"])} for m in messages]


@functools.lru_cache(maxsize=8)
def plain_text_for(tokenizer: Any) -> PlainText:
    """The tokenizer's PlainText, compiled on first use (a server has one tokenizer)."""
    return PlainText(tokenizer)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to the assistant's answer, as a server renders a
    request: the chat template's markup is real, the messages' text is plain."""
    plain = plain_text_for(tokenizer).messages(messages)
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of untrusted raw text (a completion prompt), kept plain."""
    plain = plain_text_for(tokenizer)(text)
    return list(tokenizer(plain, add_special_tokens=False)["input_ids"])


def messages_for(example: Example, spec: JobSpec) -> list[dict[str, str]]:
    """The conversation up to the answer: system prompt (if any) and the user turn."""
    if example.messages:
        return example.messages[:-1]
    messages = []
    if spec.task.system_prompt:
        messages.append({"role": "system", "content": spec.task.system_prompt})
    messages.append({"role": "user", "content": user_message(example, spec)})
    return messages


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    weight: float = 1.0
    """How much this example's loss counts (task.classWeights)."""
    positions: list[int] | None = None
    """Packed sequences only: position ids restarting at 0 for each example packed in, which
    also keeps each example's attention within itself (see training.train.pack)."""


class PromptFormatter:
    """Turns examples into token ids with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, spec: JobSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = spec.hyperparameters.max_seq_length
        self.raw_text = (
            spec.method.type == "continued-pretraining" or spec.dataset.format == "completion"
        )
        self.plain = plain_text_for(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _conversation(self, example: Example) -> list[dict[str, str]]:
        return self.plain.messages(messages_for(example, self.spec))

    def prompt_ids(self, example: Example) -> list[int]:
        if self.raw_text:
            return []
        text = self.tokenizer.apply_chat_template(
            self._conversation(example), tokenize=False, add_generation_prompt=True
        )
        return self._ids(text)

    def target_ids(self, example: Example, target: str | None = None) -> list[int]:
        """Target tokens as they follow the prompt in the rendered conversation."""
        target = self.plain(example.target if target is None else target)
        if self.raw_text:
            return [*self._ids(target), self.tokenizer.eos_token_id]
        messages = [*self._conversation(example), {"role": "assistant", "content": target}]
        full = self._ids(self.tokenizer.apply_chat_template(messages, tokenize=False))
        prompt = self.prompt_ids(example)
        if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns
            return [*self._ids(target), self.tokenizer.eos_token_id]
        return full[len(prompt) :]

    def encode(self, example: Example) -> Encoded | None:
        """Token ids and labels (prompt masked). None when too long and the policy is drop."""
        prompt, target = self.prompt_ids(example), self.target_ids(example)
        truncated = False
        if len(prompt) + len(target) > self.max_length:
            if self.spec.dataset.on_too_long == "drop":
                return None
            truncated = True
            room = self.max_length - len(target)
            if room < 8:
                target = target[: self.max_length - 8]
                room = 8
            prompt = fit_prompt(prompt, room)
        labels = [IGNORE] * len(prompt) + target
        return Encoded(prompt + target, labels, truncated)


def fit_prompt(prompt: list[int], room: int) -> list[int]:
    """A prompt cut to `room` tokens the way training cuts it: keep the start (system prompt,
    task template, the beginning of the input) and the end (the chat template's assistant
    header, which the answer must follow); drop the middle. Serving cuts the same way, so
    text appended to a log line cannot push the instructions out of the prompt."""
    if len(prompt) <= room:
        return prompt
    head, tail = room // 2, room - room // 2
    return prompt[:head] + prompt[len(prompt) - tail :]


def label_token_ids(
    formatter: PromptFormatter, example: Example, labels: list[str]
) -> list[list[int]]:
    """The target ids of each label after this example's prompt."""
    return [formatter.target_ids(example, label) for label in labels]


def first_tokens_distinct(label_ids: list[list[int]]) -> bool:
    """Whether every label starts with a token of its own: one forward pass then scores them
    all (otherwise each label's whole sequence must be scored)."""
    firsts = [ids[0] for ids in label_ids]
    return len(set(firsts)) == len(firsts)
