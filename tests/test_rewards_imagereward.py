"""ImageReward from a local folder, offline (awm_jax/rewards/imagereward.py): a tiny random checkpoint in the
published key layout (BLIP's timm-style ViT, med.py BERT, the MLP), scored against an independent forward of
the ViT written from salesforce/BLIP models/vit.py and transformers' BLIP text encoder on the same weights."""

import json

import numpy as np
import pytest
import torch

from awm_jax import rewards
from awm_jax.rewards.base import RewardConfigError
from awm_jax.rewards.imagereward import MEAN, STD, preprocess

W, HEADS, LAYERS, PATCH, SIZE = 32, 2, 2, 8, 32
WORDS = ["a", "photo", "of", "dog", "cat", "red", "on", "the", "grass"]


def _vit_state(g):
    n = (SIZE // PATCH) ** 2
    s = {
        "cls_token": (1, 1, W),
        "pos_embed": (1, n + 1, W),
        "patch_embed.proj.weight": (W, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (W,),
        "norm.weight": (W,),
        "norm.bias": (W,),
    }
    for i in range(LAYERS):
        b = f"blocks.{i}."
        s.update(
            {
                b + "norm1.weight": (W,),
                b + "norm1.bias": (W,),
                b + "attn.qkv.weight": (3 * W, W),
                b + "attn.qkv.bias": (3 * W,),
                b + "attn.proj.weight": (W, W),
                b + "attn.proj.bias": (W,),
                b + "norm2.weight": (W,),
                b + "norm2.bias": (W,),
                b + "mlp.fc1.weight": (4 * W, W),
                b + "mlp.fc1.bias": (4 * W,),
                b + "mlp.fc2.weight": (W, 4 * W),
                b + "mlp.fc2.bias": (W,),
            }
        )
    return {
        k: torch.randn(shape, generator=g) * (0.3 if len(shape) > 1 else 0.1)
        + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
        for k, shape in s.items()
    }


def _vit_ref(st, x):
    """The BLIP ViT forward (salesforce/BLIP models/vit.py VisionTransformer.forward), eps 1e-6."""
    F = torch.nn.functional
    x = F.conv2d(x, st["patch_embed.proj.weight"], st["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([st["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + st["pos_embed"]
    for i in range(LAYERS):
        def p(n, i=i):
            return st[f"blocks.{i}.{n}"]

        h = F.layer_norm(x, (W,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k, v = (
            F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
            .reshape(len(x), -1, 3, HEADS, W // HEADS)
            .permute(2, 0, 3, 1, 4)
        )
        a = ((q @ k.transpose(-2, -1)) * (W // HEADS) ** -0.5).softmax(-1)
        x = x + F.linear(
            (a @ v).transpose(1, 2).reshape(len(x), -1, W), p("attn.proj.weight"), p("attn.proj.bias")
        )
        h = F.layer_norm(x, (W,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
            p("mlp.fc2.weight"),
            p("mlp.fc2.bias"),
        )
    return F.layer_norm(x, (W,), st["norm.weight"], st["norm.bias"], 1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    from awm_jax.rewards.aesthetic import head_class

    root = tmp_path_factory.mktemp("imagereward")
    tokdir = root / "tokenizer"
    tokdir.mkdir()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(str(tokdir))
    med = {
        "vocab_size": 5 + len(WORDS) + 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 40,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "add_cross_attention": True,
        "encoder_width": 768,
    }
    (root / "med_config.json").write_text(json.dumps(med))
    g = torch.Generator().manual_seed(0)
    vit = _vit_state(g)
    torch.manual_seed(0)
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=32,
            encoder_hidden_size=W,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    ).eval()
    head = head_class()(32).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(256, W)  # in the published file, unused by the reward
    torch.save(state, root / "ImageReward.pt")
    return root, vit, text, head


def test_imagereward_equals_the_reference_forward(folder):
    root, vit, text, head = folder
    scorer = rewards.get("imagereward", model_path=str(root), batch_size=2, vision_heads=HEADS)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)  # non-square: crop
    prompts = ["a photo of a dog", "a red cat on the grass", "zebra"]  # "zebra": [UNK]
    got = scorer(imgs, prompts)
    pix = torch.from_numpy(preprocess(imgs, SIZE))
    assert pix.shape == (3, 3, SIZE, SIZE)
    tok = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and (tok["input_ids"][:, 0] == 2).all()  # [CLS] first, as BLIP
    with torch.no_grad():
        img = _vit_ref(vit, pix)
        h = text(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            encoder_hidden_states=img,
            encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        want = ((head(h[:, 0]).squeeze(-1) - MEAN) / STD).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0  # prompts / images change the score


def test_imagereward_named_errors(folder, tmp_path):
    root = folder[0]
    with pytest.raises(RewardConfigError, match="med_config.json"):
        rewards.get("imagereward", model_path=str(tmp_path), tokenizer_path=str(root / "tokenizer"))
    state = torch.load(root / "ImageReward.pt", weights_only=True)
    del state["mlp.layers.7.bias"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "med_config.json").write_text((root / "med_config.json").read_text())
    torch.save(state, bad / "ImageReward.pt")
    with pytest.raises(RewardConfigError, match=r"head keys missing \['layers.7.bias'\]"):
        rewards.get(
            "imagereward", model_path=str(bad), tokenizer_path=str(root / "tokenizer"), vision_heads=HEADS
        )
