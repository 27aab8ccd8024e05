"""MaskCLIP dense zero-shot prediction (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022).

Dense image features come from a frozen CLIP without query-key attention in the last step:

- ViT: the last block's value path. With ``y = ln_1(x)`` and ``v = y W_v + b_v``,
  ``x' = x + out_proj(v)`` then ``x'' = x' + mlp(ln_2(x'))`` (the residual and MLP kept, as in
  MaskCLIP's released code), and the patch tokens go through ``ln_post`` and ``proj``.
- ResNet: the attention pool's value and output projections applied as 1x1 convolutions to the
  final feature map, ``c_proj(v_proj(f))`` (no positional embedding).

The features ``F`` (B, E, h, w) are L2-normalised over E; class embeddings ``T`` (K, E) are the
normalised averages of the normalised text embeddings of each class's prompts;
``logits[b, k, i] = s * <F[b, :, i], T[k]>`` with ``s = exp(logit_scale)`` (Sec. 3.2 of the
MaskCLIP paper). Two training-free refinements (their Sec. 3.3):

- *prompt denoising*: a class whose probability ``softmax(logits)`` stays below ``threshold``
  at every location of the image is dropped (its logit set to ``-inf``);
- *key smoothing*: with the last layer's keys ``k`` (ViT: the last block's key projection of
  ``ln_1(x)``; ResNet: ``k_proj`` as a 1x1 conv), L2-normalised, the probabilities at location
  ``i`` become ``sum_j w_ij p_j / sum_j w_ij`` with ``w_ij = max(0, <k_i, k_j>)``. MaskCLIP
  uses the raw cosine; negative weights are dropped here so that the result stays a
  distribution (the soft pseudo label APro refines). Locations whose top probability is at
  least ``threshold`` keep theirs (threshold 1 smooths every location).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .model import CLIP, CLIP_MEAN, CLIP_STD, ModifiedResNet
from .prompts import IMAGENET_TEMPLATES, VOC_PROMPT_NAMES, check_templates
from .tokenizer import SimpleTokenizer


def clip_normalize(image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> CLIP-normalised."""
    mean = image.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (image - mean) / std


@torch.no_grad()
def text_embeddings(clip: CLIP, tokenizer: SimpleTokenizer, names: Sequence[str],
                    templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """``(K, E)`` unit class embeddings: per class, the normalised mean of the normalised
    embeddings of ``template.format(name)`` over the templates (CLIP's prompt ensembling)."""
    templates = check_templates(templates)
    if isinstance(names, str) or not names:
        raise ValueError("names must be a non-empty sequence of class names")
    device = clip.token_embedding.weight.device
    rows = []
    for name in names:
        tokens = tokenizer([t.format(name) for t in templates], clip.config.context_length, truncate=True)
        emb = F.normalize(clip.encode_text(tokens.to(device)).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)


@torch.no_grad()
def dense_features(clip: CLIP, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MaskCLIP's dense value features and the last layer's keys.

    Args:
        clip: a :class:`CLIP` (either family).
        image: ``(B, 3, H, W)`` CLIP-normalised (see :func:`clip_normalize`); the ViT takes any
            size (positional embeddings resized to the patch grid, crops to multiples of the patch).

    Returns:
        ``features`` ``(B, E, h, w)`` (not normalised) and ``keys`` ``(B, D, h, w)``, with
        ``(h, w)`` the patch grid (ViT) or the stride-32 grid (ResNet).
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    visual = clip.visual
    if isinstance(visual, ModifiedResNet):
        fmap = visual.features(image)
        pool = visual.attnpool
        v = F.conv2d(fmap, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
        features = F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
        keys = F.conv2d(fmap, pool.k_proj.weight[:, :, None, None], pool.k_proj.bias)
        return features.float(), keys.float()
    x, (h, w) = visual.tokens(image)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    y = last.ln_1(x)
    width = y.shape[-1]
    wq, wk, wv = last.attn.in_proj_weight.split(width, 0)
    bq, bk, bv = last.attn.in_proj_bias.split(width, 0)
    v = F.linear(y, wv, bv)
    k = F.linear(y, wk, bk)
    x = x + last.attn.out_proj(v)
    x = x + last.mlp(last.ln_2(x))
    tokens = visual.ln_post(x[1:]) @ visual.proj  # (hw, B, E)
    b = image.shape[0]
    features = tokens.permute(1, 2, 0).reshape(b, -1, h, w)
    keys = k[1:].permute(1, 2, 0).reshape(b, -1, h, w)
    return features.float(), keys.float()


def dense_logits(features: torch.Tensor, class_embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, K, h, w) = scale * cos(features, class_embeddings)``.

    ``features``: ``(B, E, h, w)``; ``class_embeddings``: ``(K, E)`` (normalised here too).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, E, h, w), got {tuple(features.shape)}")
    if class_embeddings.dim() != 2 or class_embeddings.shape[1] != features.shape[1]:
        raise ValueError(f"class_embeddings must be (K, {features.shape[1]}), got {tuple(class_embeddings.shape)}")
    f = F.normalize(features, dim=1)
    t = F.normalize(class_embeddings.to(f), dim=1)
    return scale * torch.einsum("behw,ke->bkhw", f, t)


def prompt_denoising(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Drop (logit ``-inf``) each class whose softmax probability is below ``threshold`` at
    every location of its image; the image's strongest class is always kept. ``(B, K, h, w)``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    peak = logits.softmax(1).flatten(2).amax(-1)  # (B, K)
    keep = peak >= threshold
    keep[torch.arange(len(peak)), peak.argmax(1)] = True
    return logits.masked_fill(~keep[:, :, None, None], float("-inf"))


def key_smoothing(probabilities: torch.Tensor, keys: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Average probabilities over locations with similar keys (see the module docstring).

    ``probabilities``: ``(B, K, h, w)``; ``keys``: ``(B, D, h, w)``. Returns ``(B, K, h, w)``.
    """
    if probabilities.shape[0] != keys.shape[0] or probabilities.shape[2:] != keys.shape[2:]:
        raise ValueError(f"probabilities {tuple(probabilities.shape)} and keys {tuple(keys.shape)} "
                         "must share batch and grid")
    b, c, h, w = probabilities.shape
    k = F.normalize(keys.flatten(2), dim=1)  # (B, D, N)
    weights = (k.transpose(1, 2) @ k).clamp_min(0)  # (B, N, N)
    p = probabilities.flatten(2)  # (B, K, N)
    smoothed = (p @ weights.transpose(1, 2)) / weights.sum(-1)[:, None, :].clamp_min(1e-12)
    unsure = (p.amax(1, keepdim=True) < threshold).expand_as(p)
    return torch.where(unsure, smoothed, p).view(b, c, h, w)


class MaskCLIP(nn.Module):
    """Dense zero-shot class probabilities from a frozen CLIP.

    Args:
        clip: the model (see :func:`~apro.modeling.clip.load_clip`).
        tokenizer: its BPE tokenizer.
        class_names: the words given to the text encoder, one per output class
            (default: VOC's background + 20 classes).
        templates: prompt templates (default the 85 of :data:`IMAGENET_TEMPLATES`).
        key_smoothing: threshold of :func:`key_smoothing`, ``None`` to skip it.
        prompt_denoising: threshold of :func:`prompt_denoising`, ``None`` to skip it.
    """

    def __init__(self, clip: CLIP, tokenizer: SimpleTokenizer, class_names: Sequence[str] = VOC_PROMPT_NAMES,
                 templates: Sequence[str] = IMAGENET_TEMPLATES, key_smoothing: Optional[float] = 1.0,
                 prompt_denoising: Optional[float] = 0.5):
        super().__init__()
        self.clip = clip.eval()
        self.class_names = tuple(class_names)
        self.key_smoothing = key_smoothing
        self.prompt_denoising = prompt_denoising
        self.register_buffer("class_embeddings", text_embeddings(clip, tokenizer, self.class_names, templates))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @torch.no_grad()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` scaled cosine logits (prompt denoising applied when enabled).

        ``image``: ``(B, 3, H, W)`` RGB in [0, 1].
        """
        feats, _ = dense_features(self.clip, clip_normalize(image))
        out = dense_logits(feats, self.class_embeddings, float(self.clip.logit_scale.exp()))
        return out if self.prompt_denoising is None else prompt_denoising(out, self.prompt_denoising)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` class probabilities on the feature grid; ``image`` RGB in [0, 1]."""
        feats, keys = dense_features(self.clip, clip_normalize(image))
        logits = dense_logits(feats, self.class_embeddings, float(self.clip.logit_scale.exp()))
        if self.prompt_denoising is not None:
            logits = prompt_denoising(logits, self.prompt_denoising)
        probs = logits.softmax(1)
        if self.key_smoothing is not None:
            probs = key_smoothing(probs, keys, self.key_smoothing)
        return probs
