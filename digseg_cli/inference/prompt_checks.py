"""Warnings about a prompt a model may not understand, for `segment` to print before it runs.

One job: say when a prompt is longer than the text encoder takes, and when the model is unlikely to know
what it means: for a model that records its training vocabulary (`DigsegConfig.trained_words`), when the
prompt's pooled embedding is far (cosine similarity under `known_prompt_similarity`) from every word it
trained on, naming the nearest ones; for any other, when its tokenizer splits a word into pieces. It encodes
prompts through the pipeline (`DigsegPipeline.encode_prompts`, cached there); it never changes a prompt.
"""

from __future__ import annotations

import re

import torch


def prompt_warnings(pipe, text: str) -> list[str]:
    """Warnings for `text` on `pipe` (a `DigsegPipeline`): too long; far from training, else unknown words."""
    warnings = []
    limit = pipe.tokenizer.model_max_length
    n = len(pipe.tokenizer(text, truncation=False).input_ids)
    if n > limit:
        warnings.append(f"prompt {text!r} is {n} tokens; the text encoder takes {limit}, the rest is cut off")
    if pipe.config.trained_words():
        return warnings + far_from_training(pipe, text)
    return warnings + unknown_words(pipe.tokenizer, text)


def far_from_training(pipe, text: str) -> list[str]:
    """One warning when `text`'s pooled embedding is far (cosine) from every word the model trained on."""
    trained = pipe.config.trained_words()
    _, pooled = pipe.encode_prompts([text, *trained])  # [1+T,D]
    unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
    similarity = unit[1:] @ unit[0]  # [T]
    floor = pipe.config.known_prompt_similarity
    if float(similarity.max()) >= floor:
        return []
    top = similarity.topk(min(3, len(trained)))
    pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
    nearest = ", ".join(f"{trained[i]!r} {v:.2f}" for v, i in pairs)
    return [
        f"prompt {text!r} is far from every word the model trained on (nearest: {nearest}; known words are at "
        f"{floor:.2f} or more): what it marks is a guess"
    ]


def unknown_words(tokenizer, text: str) -> list[str]:
    """A warning per word the tokenizer lacks: it falls back to sub-word or byte pieces (or the unknown token)."""
    warnings = []
    for word in re.findall(r"[^\W\d_]+", text.lower()):
        pieces = tokenizer.tokenize(word)
        if tokenizer.unk_token in pieces or len(pieces) >= 3:
            warnings.append(f"the model's tokenizer does not know the word {word!r} (split into {len(pieces)} pieces)")
    return warnings
