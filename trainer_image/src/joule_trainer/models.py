"""Two small but real models: a GPT-style character language model and a CNN classifier."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer over characters; causal self-attention, learned positions."""

    def __init__(
        self,
        vocab: int,
        block: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block = block
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        mask = torch.triu(torch.full((block, block), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        self.per_sample = False  # see for_per_sample_gradients

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        positions = torch.arange(t, device=idx.device)
        if self.per_sample:  # one row of positions per sample: a batch dimension for Opacus
            positions = positions.expand(idx.shape[0], t)
        x = self.tok(idx) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, self.mask[:t, :t])
        return self.head(self.ln(x))


class CausalSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention (same weights, same arithmetic) out of two
    ``nn.Linear`` layers, whose per-sample gradients Opacus computes. Opacus has no
    per-sample gradient for ``nn.MultiheadAttention``, and its replacement,
    ``DPMultiheadAttention``, refuses a 2-D mask with ``batch_first=True`` (1.6.0)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.heads = mha.num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, None]:
        b, t, d = query.shape  # self-attention: key and value are the query
        qkv = self.qkv(query).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d)), None


def for_per_sample_gradients(model: TinyGPT) -> TinyGPT:
    """The model, in place, as differential privacy needs it: every parameter in a layer
    Opacus computes per-sample gradients for (Linear, Embedding, LayerNorm), the positions'
    embedding looked up per sample. The same function with the same initial weights; its
    state dict names the attention's weights ``attn.qkv.*`` instead of ``attn.in_proj_*``."""
    for blk in model.blocks:
        if isinstance(blk.attn, nn.MultiheadAttention):
            blk.attn = CausalSelfAttention(blk.attn)
    model.per_sample = True
    return model


class SmallCNN(nn.Module):
    def __init__(self, classes: int, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
