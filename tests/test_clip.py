"""CLIP in plain PyTorch: tiny random models of both families saved in OpenAI's TorchScript
format and in Hugging Face style folders, loaded back with identical outputs; bad
checkpoints refused with the offending keys named."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from apro.modeling.clip import CLIP, CLIPConfig, build_clip, config_from_state_dict, load_clip, load_hf, load_openai


def tiny_config(family: str) -> CLIPConfig:
    common = dict(embed_dim=24, context_length=10, vocab_size=80, transformer_width=64,
                  transformer_heads=1, transformer_layers=2)
    if family == "vit":
        return CLIPConfig(image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8, **common)
    return CLIPConfig(image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=8, vision_patch_size=None,
                      **common)


def tiny_clip(family: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(tiny_config(family))
    with torch.no_grad():  # non-trivial batch-norm statistics and affine terms
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


class _Holder(nn.Module):
    """A module tree carrying given tensors under their dotted names (like OpenAI's archives)."""

    def __init__(self, state: dict):
        super().__init__()
        for key, value in state.items():
            module = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if value.is_floating_point():
                module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_openai(model: CLIP, path) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # OpenAI's archives also carry these integer scalars next to the weights.
    state["input_resolution"] = torch.tensor(model.config.image_resolution)
    state["context_length"] = torch.tensor(model.config.context_length)
    state["vocab_size"] = torch.tensor(model.config.vocab_size)
    torch.jit.save(torch.jit.script(_Holder(state)), str(path))


def to_hf_names(state: dict) -> dict:
    """OpenAI -> transformers CLIPModel names, written from transformers' naming (ViT only)."""
    out = {}
    for key, v in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for prefix, tower in (("visual.transformer.resblocks.", "vision_model"), ("transformer.resblocks.", "text_model")):
            if key.startswith(prefix):
                i, rest = key[len(prefix):].split(".", 1)
                base = f"{tower}.encoder.layers.{i}."
                if rest.startswith("attn.in_proj_"):
                    kind = rest.rsplit("_", 1)[1]
                    q, k, val = v.chunk(3, 0)
                    out[base + f"self_attn.q_proj.{kind}"] = q.clone()
                    out[base + f"self_attn.k_proj.{kind}"] = k.clone()
                    out[base + f"self_attn.v_proj.{kind}"] = val.clone()
                else:
                    rest = (rest.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
                            .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
                    out[base + rest] = v
                break
        else:
            names = {
                "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final.weight": "text_model.final_layer_norm.weight",
                "ln_final.bias": "text_model.final_layer_norm.bias",
                "visual.class_embedding": "vision_model.embeddings.class_embedding",
                "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                "visual.ln_post.bias": "vision_model.post_layernorm.bias",
                "logit_scale": "logit_scale",
            }
            if key == "text_projection":
                out["text_projection.weight"] = v.t().contiguous()
            elif key == "visual.proj":
                out["visual_projection.weight"] = v.t().contiguous()
            else:
                out[names[key]] = v
    out["text_model.embeddings.position_ids"] = torch.arange(state["positional_embedding"].shape[0])[None]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: CLIPConfig) -> dict:
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "text_config": {"hidden_size": cfg.transformer_width, "intermediate_size": cfg.text_mlp_width,
                        "num_attention_heads": cfg.transformer_heads, "num_hidden_layers": cfg.transformer_layers,
                        "max_position_embeddings": cfg.context_length, "vocab_size": cfg.vocab_size,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "vision_config": {"hidden_size": cfg.vision_width, "intermediate_size": cfg.vision_mlp_width,
                          "num_attention_heads": cfg.vision_heads, "num_hidden_layers": cfg.vision_layers,
                          "image_size": cfg.image_resolution, "patch_size": cfg.vision_patch_size,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    }


def save_hf(model: CLIP, folder) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if model.config.is_vit:
        save_file(to_hf_names(state), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(hf_config(model.config)))
    else:  # transformers has no ResNet CLIP: OpenCLIP-style folder with OpenAI names
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))


def _inputs(model: CLIP):
    g = torch.Generator().manual_seed(1)
    res = model.config.image_resolution
    image = torch.randn(2, 3, res, res, generator=g)
    tokens = torch.randint(1, model.config.vocab_size - 1, (3, model.config.context_length), generator=g)
    tokens[:, 6] = model.config.vocab_size - 1  # end-of-text: the largest id
    tokens[:, 7:] = 0
    return image, tokens


def _outputs(model: CLIP, image, tokens):
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(tokens)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_both_formats_load_with_identical_outputs(tmp_path, family):
    pytest.importorskip("safetensors")
    model = tiny_clip(family)
    save_openai(model, tmp_path / "model.pt")
    save_hf(model, tmp_path / "hf")
    image, tokens = _inputs(model)
    ref_img, ref_txt = _outputs(model, image, tokens)
    assert ref_img.abs().max() > 0 and ref_txt.std() > 0
    for loaded in (load_openai(tmp_path / "model.pt"), load_hf(tmp_path / "hf"),
                   load_clip(str(tmp_path / "model.pt")), load_clip(str(tmp_path / "hf"))):
        assert loaded.config.is_vit == (family == "vit")
        img, txt = _outputs(loaded, image, tokens)
        torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-5)
        assert float(loaded.logit_scale.detach()) == float(model.logit_scale.detach())


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_config_inferred_from_shapes(family):
    model = tiny_clip(family)
    cfg = config_from_state_dict(model.state_dict())
    ref = tiny_config(family)
    for name in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                 "context_length", "vocab_size", "transformer_width", "transformer_layers"):
        assert getattr(cfg, name) == getattr(ref, name), name


def test_encoders_depend_on_their_inputs():
    model = tiny_clip("vit")
    image, tokens = _inputs(model)
    a = model.encode_text(tokens)
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 70 + 1
    b = model.encode_text(changed)
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.allclose(a[1:], b[1:])
    # tokens after the end-of-text token do not matter (causal mask, pooled at end-of-text)
    padded = tokens.clone()
    padded[:, 8] = 5
    torch.testing.assert_close(model.encode_text(padded), a)
    logits_img, logits_txt = model(image, tokens)
    assert logits_img.shape == (2, 3) and torch.equal(logits_img.t(), logits_txt)


def test_partial_openai_checkpoint_names_missing_keys(tmp_path):
    model = tiny_clip("vit")
    state = {k: v for k, v in model.state_dict().items() if "resblocks.1.mlp.c_fc" not in k}
    with pytest.raises(ValueError, match=r"missing key.*transformer\.resblocks\.1\.mlp\.c_fc"):
        build_clip(state)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*missing"):
        load_openai(tmp_path / "partial.pt")


def test_misshaped_checkpoint_names_the_key():
    model = tiny_clip("resnet")
    state = dict(model.state_dict())
    state["visual.attnpool.c_proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"mis-shaped.*visual\.attnpool\.c_proj\.bias.*\(7,\).*\(24,\)"):
        build_clip(state)


def test_not_a_clip_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP checkpoint.*missing"):
        load_openai(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_openai(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_clip(str(tmp_path / "absent.pt"))


def test_hf_folder_with_missing_projection_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    model = tiny_clip("vit")
    save_hf(model, tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    state["text_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path / "hf")
    message = str(err.value)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in message and "text_model.extra.weight" in message
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "hf")
