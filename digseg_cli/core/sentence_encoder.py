"""A frozen pretrained sentence encoder as DiGSeg's text encoder (DESIGN §1.4, open vocabulary).

One job: turn token ids into what the U-Net and the text pathway read, from a pretrained BERT-style
encoder that never trains. The prompt's sentence embedding is the encoder's mean over its real tokens,
L2-normalised (how sentence-transformers pools all-MiniLM-L6-v2); a small trainable adapter maps it to the
few context tokens the U-Net's cross-attention reads. Everything the model does with a prompt is therefore a
function of that one embedding, so two prompts whose embeddings are close are answered alike: that is what
lets a word never seen in training land on the class it means.

Tensor-only: it does not know where the encoder's files are, how they are checked (`models.text_encoders`),
tokenizers or saving.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

CACHE_LIMIT = 4096  # distinct prompts whose embeddings are kept (the encoder is frozen: they never change)


class EncoderOutput(NamedTuple):
    """Read by name or, as transformers' text encoders' outputs are (`output[0]`), by position."""

    last_hidden_state: torch.Tensor  # [B,N,D]: the context tokens the U-Net's cross-attention reads
    pooler_output: torch.Tensor  # [B,E]: the unit sentence embedding


class SentenceEncoder(nn.Module):
    """`encoder` (frozen, always in eval mode) + `adapter`: ids `[B,L]` → context `[B,N,D]`, embedding `[B,E]`.

    The adapter's last layer starts at zero, so a fresh model's cross-attention reads zeros (a prompt
    steers it through the FiLM pathway first, as a fresh text pathway starts as the identity)."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        context_dim: int,
        context_tokens: int = 4,
        hidden: int = 256,
        pad_token_id: int = 0,
        name: str = "",
    ):
        super().__init__()
        self.name = name  # which pretrained encoder this is (a registry name), for the checkpoint's record
        self.encoder = encoder.requires_grad_(False).eval()
        self.embedding_dim = int(encoder.config.hidden_size)
        self.context_dim, self.context_tokens, self.hidden = int(context_dim), int(context_tokens), int(hidden)
        self.pad_token_id = int(pad_token_id)
        self.adapter = nn.Sequential(
            nn.Linear(self.embedding_dim, hidden), nn.SiLU(), nn.Linear(hidden, context_tokens * context_dim)
        )
        nn.init.zeros_(self.adapter[-1].weight)
        nn.init.zeros_(self.adapter[-1].bias)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    # As transformers' and diffusers' models have them: pipelines built from these parts (diffusers' Marigold,
    # for one) ask their components where they are.
    @property
    def device(self) -> torch.device:
        return self.adapter[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter[0].weight.dtype

    # The pretrained encoder never trains: only the adapter follows requires_grad_ and train().
    def requires_grad_(self, requires_grad: bool = True) -> SentenceEncoder:
        self.adapter.requires_grad_(requires_grad)
        return self

    def train(self, mode: bool = True) -> SentenceEncoder:
        super().train(mode)
        self.encoder.eval()  # its dropout would make one prompt's embedding differ call to call
        return self

    def _apply(self, fn, recurse: bool = True):
        self._cache.clear()  # moved or cast: cached embeddings are on the old device / dtype
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids `[B,L]` → unit sentence embeddings `[B,E]`, each distinct prompt computed once."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        keys = [
            tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
        if missing:
            rows = [keys.index(key) for key in missing]
            hidden = self.encoder(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
            weights = attention_mask[rows, :, None].to(hidden.dtype)  # [b,L,1]
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # [b,E]
            if len(self._cache) + len(missing) > CACHE_LIMIT:
                self._cache.clear()
            self._cache.update(zip(missing, nn.functional.normalize(mean, dim=-1), strict=True))
        return torch.stack([self._cache[key] for key in keys])  # [B,E]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        """What `DigsegModel.encode_prompt` reads: `last_hidden_state` `[B,N,D]` and `pooler_output` `[B,E]`."""
        pooled = self.embed(input_ids, attention_mask)  # [B,E], no gradient: the encoder is frozen
        context = self.adapter(pooled.to(self.dtype))  # [B,N·D]
        context = context.view(-1, self.context_tokens, self.context_dim)  # [B,N,D]
        return EncoderOutput(context, pooled)
