"""MaskCLIP dense prediction against an independent computation written from the equations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apro.modeling.clip import (MaskCLIP, dense_features, dense_logits, key_smoothing, prompt_denoising,
                                text_embeddings)
from apro.modeling.clip.tokenizer import EOT, SOT, SimpleTokenizer, bytes_to_unicode
from test_clip import tiny_clip


def _tiny_tokenizer(vocab_size: int) -> SimpleTokenizer:
    """A vocabulary of exactly ``vocab_size`` ids: byte symbols (modulo the size) + specials."""
    chars = list(bytes_to_unicode().values())
    symbols = [c + "</w>" for c in chars] + chars
    enc = {s: i % (vocab_size - 2) for i, s in enumerate(symbols)}
    enc[SOT], enc[EOT] = vocab_size - 2, vocab_size - 1
    return SimpleTokenizer(enc, [])


def _layer_norm(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-5)


def _block(x, sd, p, heads):
    """One pre-norm transformer block, (N, L, D), attention written out."""
    y = _layer_norm(x, sd, p + "ln_1")
    q, k, v = (y @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
    n, length, d = q.shape
    split = lambda t: t.view(n, length, heads, d // heads).transpose(1, 2)  # noqa: E731
    att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    out = (att @ split(v)).transpose(1, 2).reshape(n, length, d)
    x = x + out @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
    return x + _mlp(_layer_norm(x, sd, p + "ln_2"), sd, p)


def _mlp(x, sd, p):
    h = x @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]


def _vit_dense_reference(model, image):
    """ViT: patches -> tokens -> all blocks but the last -> last block's value path -> ln_post, proj."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    patch = model.config.vision_patch_size
    b, _, hh, ww = image.shape
    gh, gw = hh // patch, ww // patch
    cols = F.unfold(image, patch, stride=patch)  # (B, 3*p*p, gh*gw)
    tokens = (sd["visual.conv1.weight"].flatten(1) @ cols).transpose(1, 2)  # (B, N, D)
    tokens = torch.cat([sd["visual.class_embedding"].expand(b, 1, -1), tokens], 1)
    assert tokens.shape[1] == sd["visual.positional_embedding"].shape[0], "test uses the native grid"
    x = _layer_norm(tokens + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    layers = model.config.vision_layers
    for i in range(layers - 1):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", model.config.vision_heads)
    p = f"visual.transformer.resblocks.{layers - 1}."
    y = _layer_norm(x, sd, p + "ln_1")
    d = y.shape[-1]
    w_in, b_in = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    v = y @ w_in[2 * d:].t() + b_in[2 * d:]
    k = y @ w_in[d:2 * d].t() + b_in[d:2 * d]
    x = x + v @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
    x = x + _mlp(_layer_norm(x, sd, p + "ln_2"), sd, p)
    feats = _layer_norm(x[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"]
    grid = lambda t: t.transpose(1, 2).reshape(b, -1, gh, gw)  # noqa: E731
    return grid(feats), grid(k[:, 1:])


def _cosine_logits(feats, text, scale):
    f = feats / feats.norm(dim=1, keepdim=True)
    t = text / text.norm(dim=1, keepdim=True)
    out = torch.zeros(feats.shape[0], t.shape[0], *feats.shape[2:])
    for c in range(t.shape[0]):
        out[:, c] = scale * (f * t[c].view(1, -1, 1, 1)).sum(1)
    return out


def test_vit_dense_logits_match_the_equations():
    model = tiny_clip("vit")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    feats, keys = dense_features(model, image)
    ref_feats, ref_keys = _vit_dense_reference(model, image)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-4, atol=1e-5)
    text = torch.randn(5, model.config.embed_dim, generator=torch.Generator().manual_seed(4))
    scale = float(model.logit_scale.detach().exp())
    torch.testing.assert_close(dense_logits(feats, text, scale), _cosine_logits(ref_feats, text, scale),
                               rtol=1e-4, atol=1e-4)


def test_vit_reference_sanity_full_forward():
    """The reference block (all blocks with attention, then the class token) reproduces the model's
    image embedding, so the dense reference above is built from the right pieces."""
    model = tiny_clip("vit")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cols = F.unfold(image, 8, stride=8)
    tokens = torch.cat([sd["visual.class_embedding"].expand(1, 1, -1),
                        (sd["visual.conv1.weight"].flatten(1) @ cols).transpose(1, 2)], 1)
    x = _layer_norm(tokens + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    for i in range(model.config.vision_layers):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", model.config.vision_heads)
    ref = _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
    torch.testing.assert_close(model.encode_image(image).detach(), ref, rtol=1e-4, atol=1e-5)


def test_resnet_dense_logits_are_value_then_output_projection():
    model = tiny_clip("resnet")
    image = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(6))
    feats, keys = dense_features(model, image)
    with torch.no_grad():
        fmap = model.visual.features(image)  # (1, C, 3, 2)
    pool = {k: v.detach() for k, v in model.visual.attnpool.state_dict().items()}
    assert feats.shape == (1, model.config.embed_dim, 3, 2)
    for y in range(3):
        for x in range(2):
            f = fmap[0, :, y, x]
            v = pool["v_proj.weight"] @ f + pool["v_proj.bias"]
            torch.testing.assert_close(feats[0, :, y, x], pool["c_proj.weight"] @ v + pool["c_proj.bias"],
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(keys[0, :, y, x], pool["k_proj.weight"] @ f + pool["k_proj.bias"],
                                       rtol=1e-4, atol=1e-5)


def test_text_embeddings_average_normalised_prompts():
    model = tiny_clip("vit")
    tok = _tiny_tokenizer(model.config.vocab_size)
    templates = ("a photo of a {}.", "{}", "art of the {}.")
    emb = text_embeddings(model, tok, ["cat", "dog"], templates)
    for row, name in enumerate(["cat", "dog"]):
        with torch.no_grad():
            e = model.encode_text(tok([t.format(name) for t in templates], model.config.context_length, truncate=True))
        e = e / e.norm(dim=1, keepdim=True)
        mean = e.mean(0)
        torch.testing.assert_close(emb[row], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        text_embeddings(model, tok, ["cat"], ("no slot",))


def test_prompt_denoising_drops_weak_classes():
    logits = torch.full((1, 3, 2, 2), -5.0)
    logits[0, 0] = 5.0  # class 0 wins everywhere
    logits[0, 1, 0, 0] = 5.0  # class 1 ties at one location (softmax just under 0.5)
    logits[0, 2, 1, 1] = 4.0  # class 2 never reaches 0.45
    out = prompt_denoising(logits, 0.45)
    assert torch.isinf(out[0, 2]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(prompt_denoising(torch.zeros(1, 4, 2, 2), 0.9)[0]).sum() == 4  # strongest kept


def test_key_smoothing_is_a_weighted_average_over_similar_keys():
    g = torch.Generator().manual_seed(7)
    probs = torch.rand(1, 3, 2, 3, generator=g).softmax(1)
    keys = torch.randn(1, 4, 2, 3, generator=g)
    out = key_smoothing(probs, keys, threshold=1.0)
    k = keys[0].flatten(1)
    k = k / k.norm(dim=0, keepdim=True)
    p = probs[0].flatten(1)
    for i in range(6):
        w = torch.clamp(k[:, i] @ k, min=0)
        torch.testing.assert_close(out[0].flatten(1)[:, i], (p * w).sum(1) / w.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 2, 3))
    torch.testing.assert_close(key_smoothing(probs, keys, threshold=0.0), probs)  # nothing below 0


def test_maskclip_module_end_to_end():
    model = tiny_clip("resnet")
    tok = _tiny_tokenizer(model.config.vocab_size)
    m = MaskCLIP(model, tok, ["background", "cat", "dog"], templates=("a photo of a {}.", "{}"))
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    probs = m(image)
    assert probs.shape == (1, 3, 2, 3) and torch.allclose(probs.sum(1), torch.ones(1, 2, 3), atol=1e-5)
    plain = MaskCLIP(model, tok, ["background", "cat", "dog"], templates=("a photo of a {}.", "{}"),
                     key_smoothing=None, prompt_denoising=None)
    from apro.modeling.clip import clip_normalize
    feats, _ = dense_features(model, clip_normalize(image))
    ref = _cosine_logits(feats, plain.class_embeddings, float(model.logit_scale.detach().exp())).softmax(1)
    torch.testing.assert_close(plain(image), ref, rtol=1e-4, atol=1e-5)
