"""CLIP's causal text transformer, with OpenAI's state-dict names.

Inside ``TextTransformer`` the names are OpenAI's (and open_clip's ``TextTransformer``'s):
``token_embedding``, ``positional_embedding`` (context, width),
``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``. The DualEncoder holds it as ``text``,
so an OpenAI key ``k`` is our ``text.k`` (open_clip's CustomTextCLIP layout); a DeCLIP key
``encode_text.k`` is ours ``text.k`` as well.

Tensors are batch-first, (B, L, W); OpenAI's blocks ran (L, B, W) but the weights are the same.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from declip_ds.config import TextConfig
from declip_ds.models.heads import apply_projection, make_text_projection


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention's parameters (in_proj_weight/in_proj_bias/out_proj, so checkpoints map
    1:1) with a batch-first causal forward through scaled_dot_product_attention (flash / mem-efficient
    kernels on GPU, no mask tensor)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W), rows q|k|v as in MHA
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))  # (B, L, W)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()  # OpenAI / DeCLIP: QuickGELU; most open_clip models: GELU
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act, c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, L, W)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class TextTransformer(nn.Module):
    """tokens (B, L) -> dict(pooled (B, W) at EOT, tokens (B, L, W) after ln_final, embedding (B, E))."""

    def __init__(self, cfg: TextConfig, vocab_size: int, embed_dim: int, quick_gelu: bool = True):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"model.text.width ({cfg.width}) must be divisible by model.text.heads ({cfg.heads}).")
        self.context_length, self.vocab_size, self.width = cfg.context_length, vocab_size, cfg.width
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.width)
        # bare (W, E) matrix (OpenAI) or nn.Linear(W, E) with bias (DeCLIP reference)
        self.text_projection = make_text_projection(cfg.width, embed_dim, cfg.proj_bias)
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI / open_clip initialisation (the projection is initialised by heads.py)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5  # residual-branch outputs shrink with depth
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(
                f"Got token sequences of length {L}, but the text tower's context_length is {self.context_length}; "
                f"tokenize with Tokenizer(context_length={self.context_length})."
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        x = self.ln_final(self.transformer(x))  # (B, L, W)
        # EOT has the largest id in both vocabularies; argmax returns the first maximum
        pooled = x[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        return {"pooled": pooled, "tokens": x, "embedding": apply_projection(pooled, self.text_projection)}
