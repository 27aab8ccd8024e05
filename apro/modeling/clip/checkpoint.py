"""Load CLIP weights from a local checkpoint: OpenAI ``.pt`` archives or Hugging Face folders.

- OpenAI's released files (``ViT-B-16.pt``, ``RN50.pt`` ...) are TorchScript archives; their
  state dict is read with ``torch.jit.load`` (a plain ``torch.save`` state dict also works).
- A Hugging Face ``CLIPModel`` folder: ``config.json`` + ``model.safetensors`` (ViT only:
  ``transformers`` has no ResNet CLIP). Names are converted to OpenAI's (separate q/k/v
  projections are concatenated into ``in_proj_weight``, linear projections transposed).
  A folder whose safetensors file already holds OpenAI names (as OpenCLIP exports for both
  families, ``open_clip_model.safetensors``) is read as is, with the architecture inferred
  from shapes. Reading safetensors needs the PyPI package ``safetensors`` (extra ``clip``).

Every path ends in :func:`build_clip`, which refuses a state dict that is missing keys, has
unexpected ones or mis-shaped tensors, with one ``ValueError`` naming them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch

from .model import CLIP, CLIPConfig, config_from_state_dict

# Scalars OpenAI's archives carry next to the weights (not parameters).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
SAFETENSORS_NAMES = ("model.safetensors", "open_clip_model.safetensors")


def _describe_mismatch(own: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor]) -> Optional[str]:
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if tuple(own[k].shape) != tuple(given[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:6])}"
                     + (" ..." if len(unexpected) > 6 else ""))
    if shapes:
        parts.append(f"{len(shapes)} mis-shaped key(s): " + ", ".join(
            f"{k} (checkpoint {tuple(given[k].shape)}, expected {tuple(own[k].shape)})" for k in shapes[:4])
            + (" ..." if len(shapes) > 4 else ""))
    return "; ".join(parts) or None


def build_clip(state: Dict[str, torch.Tensor], config: Optional[CLIPConfig] = None,
               source: str = "checkpoint") -> CLIP:
    """A float32 :class:`CLIP` in eval mode from an OpenAI-named state dict.

    ``config`` defaults to the one inferred from the shapes. Raises ``ValueError`` naming the
    missing, unexpected and mis-shaped keys when the state dict does not match exactly.
    """
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors")
    state = {k: v for k, v in state.items()
             if k not in _OPENAI_EXTRA_KEYS and not k.endswith("num_batches_tracked")}
    if config is None:
        try:
            config = config_from_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{source}: not a CLIP checkpoint ({exc})") from None
    model = CLIP(config)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    problem = _describe_mismatch(own, state)
    if problem:
        raise ValueError(f"{source} does not match the CLIP layout it declares "
                         f"({'ViT' if config.is_vit else 'ResNet'}): {problem}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # only counters left out
    return model.float().eval()


# ----------------------------------------------------------------------------- OpenAI


def read_openai_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """State dict of an OpenAI ``.pt`` file (TorchScript archive or plain ``torch.save``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    try:
        module = torch.jit.load(path, map_location="cpu")
        state = module.state_dict()
    except RuntimeError:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"checkpoint: cannot read {path!r} as a TorchScript archive or a "
                             f"state dict ({exc})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: {path!r} does not hold a state dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_openai(path: str) -> CLIP:
    """A :class:`CLIP` from an OpenAI ``.pt`` checkpoint."""
    return build_clip(read_openai_state_dict(path), source=f"checkpoint {os.fspath(path)!r}")


# ----------------------------------------------------------------------------- Hugging Face


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading a Hugging Face CLIP folder needs the PyPI package safetensors "
                          "(pip install safetensors, or the project's 'clip' extra)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise ValueError(f"checkpoint: cannot read {path!r} as safetensors ({exc})") from None


def config_from_hf(config: dict) -> CLIPConfig:
    """A :class:`CLIPConfig` from a ``transformers`` ``CLIPConfig`` JSON dict (ViT only)."""
    try:
        text, vision = config["text_config"], config["vision_config"]
        acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
        if len(acts) != 1:
            raise ValueError(f"text and vision activations differ ({sorted(acts)})")
        return CLIPConfig(
            embed_dim=int(config.get("projection_dim", 512)),
            image_resolution=int(vision["image_size"]), vision_layers=int(vision["num_hidden_layers"]),
            vision_width=int(vision["hidden_size"]), vision_patch_size=int(vision["patch_size"]),
            context_length=int(text["max_position_embeddings"]), vocab_size=int(text["vocab_size"]),
            transformer_width=int(text["hidden_size"]), transformer_heads=int(text["num_attention_heads"]),
            transformer_layers=int(text["num_hidden_layers"]), vision_heads=int(vision["num_attention_heads"]),
            vision_mlp_width=int(vision["intermediate_size"]), text_mlp_width=int(text["intermediate_size"]),
            activation=acts.pop(), layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)))
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]!r} (a transformers CLIPConfig is expected)") from None


_HF_BLOCK = {  # per-layer HF suffix -> OpenAI suffix (q/k/v handled separately)
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def hf_to_openai(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a ``transformers`` ``CLIPModel`` state dict to OpenAI's names.

    Keys with no OpenAI counterpart are kept under their HF name (so that the final check
    reports them as unexpected); incomplete q/k/v triples are reported as missing.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_IGNORED:
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.", 1)
            index, suffix = rest.split(".", 1)
            base = ("transformer.resblocks." if tower == "text_model" else "visual.transformer.resblocks.") + index
            match = _QKV.fullmatch(suffix)
            if match:
                qkv.setdefault((base, match.group(2)), {})[match.group(1)] = value
            else:
                out[f"{base}.{_HF_BLOCK.get(suffix, suffix)}"] = value
        else:
            out[key] = value
    for (base, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        # an incomplete triple leaves in_proj_* absent: reported as missing by build_clip
    return out


def load_hf(folder: str) -> CLIP:
    """A :class:`CLIP` from a Hugging Face style folder (see the module docstring)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint: no such folder {folder!r}")
    weights = next((os.path.join(folder, n) for n in SAFETENSORS_NAMES if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise FileNotFoundError(f"checkpoint: {folder!r} has none of {', '.join(SAFETENSORS_NAMES)}")
    state = _read_safetensors(weights)
    source = f"checkpoint {weights!r}"
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"checkpoint: {folder!r} has Hugging Face weights but no config.json")
        with open(config_path, encoding="utf-8") as f:
            config = config_from_hf(json.load(f))
        return build_clip(hf_to_openai(state), config, source)
    return build_clip(state, None, source)


def load_clip(path: str) -> CLIP:
    """A :class:`CLIP` from a folder (Hugging Face style) or a file (OpenAI ``.pt``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_hf(path)
    return load_openai(path)
