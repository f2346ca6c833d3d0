"""A tiny random Llama with a real (small) BPE tokenizer and chat template, built offline.

Fast tests train and score it for real; only its size is small."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Failed password for invalid user admin from 10.0.0.1 port 22 ssh2",
    "Accepted publickey for deploy from 192.0.2.7 port 51514",
    "The actor used PowerShell to download a payload and establish persistence.",
    "Credential dumping with Mimikatz from LSASS memory.",
    "benign malicious low medium high critical informational Discovery Execution",
    "Name the tactic. Rate the alert. Parse the log line into JSON.",
    '{"user": "<USER_1>", "source_ip": "<IP_1>", "event": "ssh_login_failed"}',
]


def train_tokenizer(
    specials: list[str], bos: str, eos: str, template: str, vocab_size: int = 400
) -> Any:
    """A small byte-level BPE tokenizer trained on CORPUS, with these added tokens (the
    first is padding) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=specials[0], bos_token=bos, eos_token=eos
    )
    fast.chat_template = template
    return fast


def build_tiny_model(directory: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files into `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    fast = train_tokenizer(
        ["<|pad|>", "<|im_start|>", "<|im_end|>"],
        "<|im_start|>",
        "<|im_end|>",
        CHAT_TEMPLATE,
        vocab_size,
    )
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,  # bitsandbytes 4-bit blocks are 64 wide
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory
