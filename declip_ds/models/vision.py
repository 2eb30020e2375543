"""Image towers built from timm (never downloading weights).

A tower's ``forward(images)`` returns, from ONE pass through the trunk, a dict

    pooled     (B, pooled_dim)  before the image projection
                                ViT: CLS token after ln_post; RN50: the attention-pool output
    tokens     (B, T, token_dim) the token outputs FILIP uses
                                ViT: patch tokens without CLS, taken BEFORE ln_post (as the DeCLIP
                                reference does); RN50: the final 7x7 map flattened to (B, 49, 2048)
    embedding  (B, embed_dim)   pooled @ proj (ViT) or pooled itself (RN50, whose attention pool's
                                c_proj already maps to embed_dim; there is no separate visual proj)

Every parameter is owned by a module whose ``forward`` runs (the tower, timm's trunk, the
attention-pool head), so DeepSpeed ZeRO-3's per-module gathering sees all of them.

Names, for a checkpoint converter (OpenAI ``visual.*`` -> ours ``visual.*``):
  ViT: conv1 -> trunk.patch_embed.proj (no bias), class_embedding -> trunk.cls_token,
       positional_embedding -> trunk.pos_embed, ln_pre -> trunk.norm_pre,
       transformer.resblocks.{i} -> trunk.blocks.{i} (ln_1 -> norm1, attn.in_proj_* -> attn.qkv,
       attn.out_proj -> attn.proj, ln_2 -> norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2),
       ln_post -> ln_post, proj -> proj (same (width, embed_dim) layout).
  RN50: timm's ByobNet CLIP layout (trunk.stem.*, trunk.stages.*, trunk.head = attention pool
       with q/k/v/proj/pos_embed).
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from declip_ds.config import VisionConfig
from declip_ds.models.norm import make_batchnorms_fp32_

# our name -> timm model name (the OpenAI CLIP ViTs use QuickGELU, as does the DeCLIP reference); with
# model.quick_gelu=false the timm tower of the same name (nn.GELU, as most open_clip / LAION models)
TIMM_VITS = {
    "vit_base_patch32_clip_224": "vit_base_patch32_clip_quickgelu_224",
    "vit_base_patch16_clip_224": "vit_base_patch16_clip_quickgelu_224",
}
TIMM_RESNETS = {"resnet50_clip": "resnet50_clip"}
CUSTOM_VITS = ("vit_tiny", "vit_custom")  # architecture read from the VisionConfig fields
# timm's ImageNet ViT design (no ln_pre, LayerNorm eps 1e-6, nn.GELU, patch-embedding bias): the official
# SLIP towers (METHODS.md §3). name -> (width, layers, heads, patch), at model.vision.image_size (224 in
# their names); "vit_plain" reads the VisionConfig fields. SLIP's ViT-S is MoCo v3's (12 heads of 32), not
# timm's vit_small (6 of 64).
PLAIN_VITS = {
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_small_mocov3_patch16_224": (384, 12, 12, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_plain": None,
}
# OpenAI's ModifiedResNet layout (timm ByobNet, attention pool) shrunk for CPU runs: one bottleneck
# per stage, widths from VisionConfig.width, total stride 16 (a 4x4 map at 64 px)
CUSTOM_RESNETS = ("resnet_tiny_clip",)
SUPPORTED = tuple(sorted([*TIMM_VITS, *TIMM_RESNETS, *CUSTOM_VITS, *PLAIN_VITS, *CUSTOM_RESNETS]))


class ViTTower(nn.Module):
    """A CLIP ViT: timm trunk (patch embed, CLS, pos embed, ln_pre, blocks) + ln_post + proj. The plain
    (SLIP) ViTs have no ln_pre; their final norm is ln_post and proj is SLIP's image_projection."""

    def __init__(self, trunk: VisionTransformer, embed_dim: int, freeze_patch_embed: bool = False):
        super().__init__()
        width = trunk.embed_dim
        # ln_post is moved out of the trunk so the trunk's own forward returns the pre-ln_post
        # tokens (B, 1 + N, width) and one pass gives both FILIP tokens and the pooled CLS.
        self.ln_post = trunk.norm
        trunk.norm = nn.Identity()
        trunk.reset_classifier(0, global_pool="")  # trunk(x) -> all tokens, no pooling, no head
        self.trunk = trunk
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, embed_dim))  # OpenAI visual.proj
        self.pooled_dim = width
        self.token_dim = width
        self.embed_dim = embed_dim
        self.num_prefix_tokens = trunk.num_prefix_tokens
        if freeze_patch_embed:  # the reference's frozen conv1 (MoCo-v3 trick): stays at its random init
            self.trunk.patch_embed.proj.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.trunk(images)  # (B, 1 + N, W), after the blocks, before ln_post
        tokens = x[:, self.num_prefix_tokens :]  # (B, N, W) patch tokens, no CLS
        pooled = self.ln_post(x[:, 0])  # (B, W) CLS after ln_post
        return {"pooled": pooled, "tokens": tokens, "embedding": pooled @ self.proj}  # embedding (B, E)


class ResNetTower(nn.Module):
    """OpenAI's ModifiedResNet (timm ``resnet50_clip``); the attention pool outputs embed_dim."""

    def __init__(self, trunk: nn.Module, embed_dim: int):
        super().__init__()
        self.trunk = trunk
        self.pooled_dim = embed_dim  # attention-pool c_proj output = the embedding
        self.token_dim = trunk.num_features  # 2048 channels of the last stage
        self.embed_dim = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.trunk.forward_features(images)  # (B, C, h, w), C = 2048, h = w = 7 at 224 px
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pooled = self.trunk.head(fmap)  # (B, E): attention pool, mean-token query, then c_proj
        return {"pooled": pooled, "tokens": tokens, "embedding": pooled}


def _check_divisible(cfg: VisionConfig, stride: int) -> None:
    if cfg.image_size % stride:
        raise ValueError(
            f"model.vision.image_size={cfg.image_size} is not divisible by {stride} (the "
            f"{'total stride' if 'resnet' in cfg.name else 'patch size'} of '{cfg.name}'); "
            f"choose a multiple of {stride}, e.g. {max(stride, cfg.image_size // stride * stride)}."
        )


def _custom_vit(cfg: VisionConfig, quick_gelu: bool = True) -> VisionTransformer:
    """OpenAI-style ViT from the config fields: pre-norm (ln_pre), QuickGELU (or GELU), CLS, bias-free conv."""
    if cfg.width % cfg.heads:
        raise ValueError(f"model.vision.width ({cfg.width}) must be divisible by model.vision.heads ({cfg.heads}).")
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.layers,
        num_heads=cfg.heads,
        pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer="quick_gelu" if quick_gelu else "gelu",
        num_classes=0,
        drop_path_rate=cfg.drop_path,
    )


def _plain_vit(cfg: VisionConfig) -> VisionTransformer:
    """timm's ImageNet ViT (VisionTransformer's defaults: no ln_pre, LayerNorm eps 1e-6, nn.GELU, qkv and
    patch-embedding biases, CLS token), the shape from PLAIN_VITS or, for vit_plain, the config fields."""
    width, layers, heads, patch = PLAIN_VITS[cfg.name] or (cfg.width, cfg.layers, cfg.heads, cfg.patch_size)
    if width % heads:
        raise ValueError(f"model.vision.width ({width}) must be divisible by model.vision.heads ({heads}).")
    _check_divisible(cfg, patch)
    return VisionTransformer(img_size=cfg.image_size, patch_size=patch, embed_dim=width, depth=layers,
                             num_heads=heads, num_classes=0, drop_path_rate=cfg.drop_path)


def _tiny_resnet(cfg: VisionConfig, embed_dim: int) -> nn.Module:
    """A small CLIP ModifiedResNet (3-conv stem, avg-pool downsampling, attention pool) for CPU runs."""
    from dataclasses import replace

    from timm.models.byobnet import ByobNet, ByoBlockCfg, model_cfgs

    w = cfg.width
    blocks = tuple(ByoBlockCfg(type="bottle", d=1, c=c, s=s, br=0.25) for c, s in ((w, 1), (2 * w, 2), (4 * w, 2), (4 * w, 1)))
    arch = replace(model_cfgs["resnet50_clip"], blocks=blocks, stem_chs=(w // 4, w // 4, w // 2))
    return ByobNet(arch, num_classes=embed_dim, img_size=cfg.image_size, drop_path_rate=cfg.drop_path)


def build_vision_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool = True) -> ViTTower | ResNetTower:
    """The image tower named by ``cfg.name`` (see ``SUPPORTED``), randomly initialised as ``cfg.init`` says
    (``init_tower_``). ``quick_gelu``: the CLIP ViTs' MLP activation (the plain ViTs use nn.GELU, as timm
    and SLIP define them; the ResNets have none)."""
    tower = _build_tower(cfg, embed_dim, quick_gelu)
    init = cfg.init if cfg.init != "auto" else ("timm" if cfg.name in PLAIN_VITS else "reference")
    if init == "reference":
        init_tower_(tower)
    return tower


def init_tower_(tower: ViTTower | ResNetTower) -> None:
    """Re-initialise a tower built by timm (timm's init: truncated normal 0.02, zero biases; convs by
    fan-out) as the DeCLIP reference code initialises its towers (``visual_transformer.py``: OpenAI CLIP's
    text-tower scheme applied to the ViT blocks; ``modified_resnet.py``: OpenAI CLIP's ResNet init):

    ViT     CLS token and proj ~ N(0, width^-1/2); positional table ~ N(0, 0.01); per block, with
            attn_std = width^-1/2, proj_std = attn_std (2 layers)^-1/2, fc_std = (2 width)^-1/2:
            qkv ~ N(0, attn_std), attn out ~ N(0, proj_std) (their biases 0, as nn.MultiheadAttention),
            mlp fc1 ~ N(0, fc_std), fc2 ~ N(0, proj_std) (biases nn.Linear's default); LayerNorms 1 / 0;
            the patch-embedding conv keeps torch's default (the frozen conv1 of the reference recipes)
    ResNet  convs torch's default (kaiming-uniform, a = sqrt 5); BatchNorms 1 / 0, the last one of each
            bottleneck 0; attention pool q, k, v, out ~ N(0, in^-1/2) (biases nn.Linear's default),
            positional table ~ N(0, 1) / in^1/2
    """
    with torch.no_grad():
        if isinstance(tower, ViTTower):
            _init_vit_(tower)
        else:
            _init_resnet_(tower.trunk)


def _init_vit_(tower: ViTTower) -> None:
    trunk = tower.trunk
    width, layers = trunk.embed_dim, len(trunk.blocks)
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    proj_std = attn_std * (2 * layers) ** -0.5  # residual-branch outputs shrink with depth
    if trunk.cls_token is not None:
        nn.init.normal_(trunk.cls_token, std=width**-0.5)
    nn.init.normal_(trunk.pos_embed, std=0.01)
    nn.init.normal_(tower.proj, std=width**-0.5)
    for block in trunk.blocks:
        for linear, std in ((block.attn.qkv, attn_std), (block.attn.proj, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        for linear, std in ((block.mlp.fc1, fc_std), (block.mlp.fc2, proj_std)):
            linear.reset_parameters()  # the bias: nn.Linear's default, U(+-1/sqrt(fan_in))
            nn.init.normal_(linear.weight, std=std)
    # LayerNorms: timm's are already the reference's (weight 1, bias 0)


def _init_resnet_(trunk: nn.Module) -> None:
    head = trunk.head  # timm's AttentionPool2d: q, k, v, proj, pos_embed
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    # BatchNorms: timm's are already the reference's (1 / 0, each bottleneck's last weight 0)
    in_dim = head.q.in_features
    for linear in (head.q, head.k, head.v, head.proj):
        linear.reset_parameters()
        nn.init.normal_(linear.weight, std=in_dim**-0.5)
    nn.init.normal_(head.pos_embed, std=in_dim**-0.5)


def _build_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> ViTTower | ResNetTower:
    if cfg.name in PLAIN_VITS:
        return ViTTower(_plain_vit(cfg), embed_dim, cfg.freeze_patch_embed)
    if cfg.name in CUSTOM_VITS:
        _check_divisible(cfg, cfg.patch_size)
        return ViTTower(_custom_vit(cfg, quick_gelu), embed_dim, cfg.freeze_patch_embed)
    if cfg.name in TIMM_VITS:
        trunk = timm.create_model(
            TIMM_VITS[cfg.name] if quick_gelu else cfg.name, pretrained=False, num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path
        )
        _check_divisible(cfg, trunk.patch_embed.patch_size[0])
        return ViTTower(trunk, embed_dim, cfg.freeze_patch_embed)
    if cfg.name in TIMM_RESNETS or cfg.name in CUSTOM_RESNETS:
        if cfg.freeze_patch_embed:
            raise ValueError(
                f"model.vision.freeze_patch_embed=true is only defined for ViTs (it freezes the patch-embedding "
                f"conv); '{cfg.name}' has none. Set model.vision.freeze_patch_embed=false."
            )
        _check_divisible(cfg, 32 if cfg.name in TIMM_RESNETS else 16)
        if cfg.name in CUSTOM_RESNETS:
            return ResNetTower(make_batchnorms_fp32_(_tiny_resnet(cfg, embed_dim)), embed_dim)
        # num_classes sets the attention pool's output projection (OpenAI attnpool.c_proj) to embed_dim
        trunk = timm.create_model(
            TIMM_RESNETS[cfg.name],
            pretrained=False,
            num_classes=embed_dim,
            img_size=cfg.image_size,
            drop_path_rate=cfg.drop_path,
        )
        return ResNetTower(make_batchnorms_fp32_(trunk), embed_dim)
    raise ValueError(f"Unknown vision tower '{cfg.name}'. Known: {', '.join(SUPPORTED)}. Set model.vision.name.")
