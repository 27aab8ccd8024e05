"""OpenAI CLIP in plain PyTorch: ModifiedResNet and ViT image encoders, the text transformer.

Parameter names follow OpenAI's released state dicts exactly (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight``, ``token_embedding.weight`` ...), so a
state dict read from their ``.pt`` archives loads with ``load_state_dict`` unchanged; Hugging
Face names are converted in :mod:`apro.modeling.clip.checkpoint`. The architecture is fully
described by :class:`CLIPConfig`, which :func:`config_from_state_dict` infers from shapes.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# CLIP's image normalisation (RGB in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    """Architecture of one CLIP model.

    ``vision_layers`` is an int (ViT depth) or a 4-tuple (blocks per ResNet stage).
    ``vision_patch_size`` is ``None`` for the ResNet family. ``activation`` is ``"quick_gelu"``
    (OpenAI's ``x * sigmoid(1.702 x)``) or ``"gelu"``.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: object
    vision_width: int
    vision_patch_size: Optional[int]
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_heads: Optional[int] = None
    vision_mlp_width: Optional[int] = None
    text_mlp_width: Optional[int] = None
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def is_vit(self) -> bool:
        return self.vision_patch_size is not None

    def __post_init__(self):
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.vision_heads is None:
            width = self.vision_width if self.is_vit else self.vision_width * 32
            self.vision_heads = max(1, width // 64)
        if self.is_vit:
            self.vision_layers = int(self.vision_layers)
            if self.vision_mlp_width is None:
                self.vision_mlp_width = 4 * self.vision_width
        else:
            self.vision_layers = tuple(int(n) for n in self.vision_layers)
            if len(self.vision_layers) != 4:
                raise ValueError(f"vision_layers of a ResNet CLIP must have 4 stages, got {self.vision_layers}")
        if self.text_mlp_width is None:
            self.text_mlp_width = 4 * self.transformer_width


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as OpenAI's, for half-precision weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


# ----------------------------------------------------------------------------- ResNet family


class _Bottleneck(nn.Module):
    """ModifiedResNet bottleneck: strides by average pooling before the last 1x1 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token attends to every location (one query)."""

    def __init__(self, spatial: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def positional(self, h: int, w: int) -> torch.Tensor:
        """``(1 + h*w, C)`` positional embedding, bicubically resized to an ``h x w`` grid."""
        return _resize_positional(self.positional_embedding, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` -> ``(B, output_dim)``."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        tokens = torch.cat([tokens.mean(0, keepdim=True), tokens], 0)
        tokens = tokens + self.positional(h, w)[:, None].to(tokens.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=c,
            num_heads=self.num_heads, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem, anti-aliased (avg-pool) strides, attention pooling."""

    def __init__(self, layers: Tuple[int, int, int, int], output_dim: int, heads: int,
                 input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [_Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        layers += [_Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised image -> ``(B, 32*width, H/32, W/32)`` before pooling."""
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.features(x))


# ----------------------------------------------------------------------------- transformers


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str = "quick_gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width, eps=eps)
        act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)), ("gelu", act), ("c_proj", nn.Linear(mlp_width, width))]))
        self.ln_2 = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``(L, B, width)`` (sequence first, as OpenAI's)."""
        y = self.ln_1(x)
        mask = None if attn_mask is None else attn_mask.to(dtype=x.dtype, device=x.device)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` named ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int,
                 activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[
            ResidualAttentionBlock(width, heads, mlp_width, activation, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def _resize_positional(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(1 + n*n, C)`` embedding (class token first) resized bicubically to ``(1 + h*w, C)``."""
    n = int(round(math.sqrt(pos.shape[0] - 1)))
    if n * n != pos.shape[0] - 1:
        raise ValueError(f"positional embedding of {pos.shape[0]} rows is not 1 + a square grid")
    if (h, w) == (n, n):
        return pos
    grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], 0)


class VisionTransformer(nn.Module):
    """CLIP's ViT: patch conv, class token, ``ln_pre``, transformer, ``ln_post``, ``proj``."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, mlp_width: Optional[int] = None, activation: str = "quick_gelu",
                 eps: float = 1e-5):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = input_resolution // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, mlp_width or 4 * width, activation, eps)
        self.ln_post = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Embedded tokens ``(1 + h*w, B, width)`` after ``ln_pre``, and the patch grid ``(h, w)``.

        Images of any size work: the positional embedding is resized to the patch grid.
        """
        x = self.conv1(x.to(self.conv1.weight.dtype))
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], 1) + _resize_positional(self.positional_embedding, h, w).to(x.dtype)
        return self.ln_pre(x).transpose(0, 1), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.tokens(x)
        out = self.transformer(tokens)
        return self.ln_post(out[0]) @ self.proj


# ----------------------------------------------------------------------------- CLIP


class CLIP(nn.Module):
    """Image and text encoders with OpenAI's parameter names; see :class:`CLIPConfig`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        if config.is_vit:
            self.visual = VisionTransformer(
                config.image_resolution, config.vision_patch_size, config.vision_width,
                config.vision_layers, config.vision_heads, config.embed_dim, config.vision_mlp_width,
                config.activation, config.layer_norm_eps)
        else:
            self.visual = ModifiedResNet(config.vision_layers, config.embed_dim, config.vision_heads,
                                         config.image_resolution, config.vision_width)
        self.transformer = Transformer(config.transformer_width, config.transformer_layers,
                                       config.transformer_heads, config.text_mlp_width,
                                       config.activation, config.layer_norm_eps)
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, config.transformer_width))
        self.ln_final = LayerNorm(config.transformer_width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(
            config.transformer_width**-0.5 * torch.randn(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", _causal_mask(config.context_length), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` CLIP-normalised image -> ``(B, embed_dim)`` (not normalised)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        return self.visual(image)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` token ids (``L <= context_length``; end-of-text has the largest id) ->
        ``(N, embed_dim)``: the final-norm feature at the end-of-text token, projected."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be a (N, L) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        n, length = tokens.shape
        if length > self.config.context_length:
            raise ValueError(f"tokens: length {length} exceeds the context length {self.config.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x.transpose(0, 1), self.attn_mask[:length, :length]).transpose(0, 1)
        x = self.ln_final(x)
        eot = tokens.argmax(-1)
        return x[torch.arange(n, device=x.device), eot] @ self.text_projection

    def forward(self, image: torch.Tensor, tokens: torch.Tensor):
        """Scaled cosine logits ``(B, N)`` per image and ``(N, B)`` per text."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def _causal_mask(length: int) -> torch.Tensor:
    """Additive ``(L, L)`` mask: ``-inf`` above the diagonal."""
    return torch.full((length, length), float("-inf")).triu(1)


def _count_blocks(state: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def config_from_state_dict(state: dict) -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from an OpenAI-named state dict (shapes only).

    Heads are ``width // 64`` as in every OpenAI release. Raises ``ValueError`` naming the key
    when one needed for the inference is missing.
    """
    def get(key):
        if key not in state:
            raise ValueError(f"checkpoint is missing {key!r}, needed to infer the CLIP architecture")
        return state[key]

    vit = "visual.proj" in state or "visual.class_embedding" in state
    if vit:
        conv = get("visual.conv1.weight")
        width, patch = conv.shape[0], conv.shape[-1]
        layers = _count_blocks(state, "visual.transformer.resblocks.")
        grid = int(round(math.sqrt(get("visual.positional_embedding").shape[0] - 1)))
        resolution = patch * grid
        vision_mlp = get("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0] if layers else None
    else:
        layers = tuple(_count_blocks(state, f"visual.layer{i}.") for i in range(1, 5))
        width = get("visual.layer1.0.conv1.weight").shape[0]
        grid = int(round(math.sqrt(get("visual.attnpool.positional_embedding").shape[0] - 1)))
        resolution = grid * 32
        patch = None
        vision_mlp = None
    text_width = get("ln_final.weight").shape[0]
    text_layers = _count_blocks(state, "transformer.resblocks.")
    text_mlp = get("transformer.resblocks.0.mlp.c_fc.weight").shape[0] if text_layers else None
    return CLIPConfig(
        embed_dim=get("text_projection").shape[1], image_resolution=resolution, vision_layers=layers,
        vision_width=width, vision_patch_size=patch,
        context_length=get("positional_embedding").shape[0], vocab_size=get("token_embedding.weight").shape[0],
        transformer_width=text_width, transformer_heads=max(1, text_width // 64),
        transformer_layers=text_layers, vision_mlp_width=vision_mlp, text_mlp_width=text_mlp)
