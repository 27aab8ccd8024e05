"""OpenAI CLIP in plain PyTorch, loaded from a local checkpoint, and MaskCLIP dense prediction.

- :mod:`.model`: ``CLIP`` (ModifiedResNet with attention pooling, or ViT; text transformer).
- :mod:`.checkpoint`: OpenAI ``.pt`` (TorchScript) and Hugging Face ``CLIPModel`` folders.
- :mod:`.tokenizer`: the byte-level BPE tokenizer (vocabulary read from disk).
- :mod:`.prompts`: the 85 ImageNet prompt templates and VOC's class names.
- :mod:`.maskclip`: dense logits, key smoothing, prompt denoising.
"""
from .checkpoint import build_clip, hf_to_openai, load_clip, load_hf, load_openai
from .maskclip import (MaskCLIP, clip_normalize, dense_features, dense_logits, key_smoothing,
                       prompt_denoising, text_embeddings)
from .model import CLIP, CLIPConfig, config_from_state_dict
from .prompts import IMAGENET_TEMPLATES, VOC_CLASSES, VOC_PROMPT_NAMES
from .tokenizer import SimpleTokenizer, load_tokenizer

__all__ = [
    "CLIP", "CLIPConfig", "config_from_state_dict", "build_clip", "hf_to_openai", "load_clip", "load_hf",
    "load_openai", "MaskCLIP", "clip_normalize", "dense_features", "dense_logits", "key_smoothing",
    "prompt_denoising", "text_embeddings", "IMAGENET_TEMPLATES", "VOC_CLASSES", "VOC_PROMPT_NAMES",
    "SimpleTokenizer", "load_tokenizer",
]
