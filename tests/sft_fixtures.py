"""A tiny chat tokenizer (word level, ChatML template) and a tiny random Llama for the SFT tests."""

from __future__ import annotations

WORDS = ["user", "assistant", "system", "what", "is", "the", "answer", "review", "good", "bad", "movie",
         "fresh", "rotten", "yes", "no", "a", "b", "c", "d", "e", "f", "g", "h"]
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: The same rendering with {% generation %} markers around each assistant turn (content and end token).
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(template: str | None = CHATML):
    """Word-level tokenizer: one id per word, <|im_start|>/<|im_end|> special, eos <|im_end|>, no pad token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL[1:]])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, tied: bool = True, initializer_range: float = 0.02):
    """A 2-layer random Llama. Untied with a wide init (0.5) its greedy answers differ from prompt
    to prompt, which the generation tests need (tied, it repeats the last prompt token)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=tied,
                         initializer_range=initializer_range)
    return LlamaForCausalLM(config).eval()
