"""Prompt formats: the model's own chat template by default, the authors' formats as presets.

Presets (the authors' formats; docs/pipeline.md):
- ``chat`` (default): ``tokenizer.apply_chat_template`` on one user turn,
  ``"{question}\\n{instruction}"``, with the generation prompt; the template's own special
  tokens only (no extra BOS).
- ``deepseek``: ``"User: {question}\\nPlease reason step by step, and put your final answer
  within \\boxed{}.\\n\\nAssistant:"`` (DeepSeek-Math instruct/RL), tokenizer's BOS added.
- ``mistral``: ``"[INST] {question}[/INST]"`` (Mistral SFT / Math-Shepherd), BOS added.
- ``qwen-chatml``: ChatML written out with the Qwen2.5-Math CoT system turn
  (``"<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n"``).
- ``plain``: ``"{question}\\n{instruction}"`` with no template (base models without one).

``instruction`` defaults to `INSTRUCTION`; a preset whose text fixes it ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from circuitdiff.errors import UserError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptFormat:
    name: str
    template: str | None  # None: the tokenizer's chat template
    add_special_tokens: bool  # let the tokenizer add its BOS to the text
    description: str


PRESETS: dict[str, PromptFormat] = {
    p.name: p
    for p in [
        PromptFormat("chat", None, False, "the tokenizer's chat template, one user turn: question + instruction"),
        PromptFormat(
            "deepseek",
            "User: {question}\n" + INSTRUCTION.replace("{}", "{{}}") + "\n\nAssistant:",
            True,
            "DeepSeek-Math: 'User: {question}\\n<instruction>\\n\\nAssistant:'",
        ),
        PromptFormat("mistral", "[INST] {question}[/INST]", True, "Mistral: '[INST] {question}[/INST]'"),
        PromptFormat(
            "qwen-chatml",
            "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
            "ChatML with the Qwen2.5-Math CoT system turn",
        ),
        PromptFormat("plain", "{question}\n{instruction}", True, "question + instruction, no template"),
    ]
}


def prompt_format(name: str) -> PromptFormat:
    if name not in PRESETS:
        raise UserError(f"prompt preset {name!r} is unknown; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def render(question: str, preset: str = "chat", tokenizer=None, instruction: str = INSTRUCTION) -> str:
    """The prompt text for `question` under `preset`."""
    fmt = prompt_format(preset)
    if fmt.template is not None:
        return fmt.template.format(question=question, instruction=instruction)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("prompt preset 'chat' needs a tokenizer with a chat template; this one has none: "
                        "use prompt: plain (or deepseek / mistral / qwen-chatml)")
    content = f"{question}\n{instruction}" if instruction else question
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def encode(question: str, tokenizer, preset: str = "chat", instruction: str = INSTRUCTION) -> list[int]:
    """Prompt token ids for `question` under `preset`."""
    fmt = prompt_format(preset)
    text = render(question, preset, tokenizer, instruction)
    return list(tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"])
