"""Parity of jaxtrain's BERT encoder with Hugging Face ``BertModel`` (torch, CPU).

Random-init tiny transformers models (no download, norms and biases perturbed so misplaced ones
show) are saved with ``save_pretrained`` and loaded with :func:`jaxtrain.hf.bert.load_hf`;
jaxtrain models written by :func:`jaxtrain.hf.bert.save_hf` are loaded with
``BertModel.from_pretrained``. Hidden states must agree to 1e-4 (float32) on real positions,
with token types and right padding.
"""

import dataclasses
import json
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxtrain.errors import ConfigError  # noqa: E402
from jaxtrain.hf import bert as hf_bert  # noqa: E402
from jaxtrain.models import get_model  # noqa: E402
from jaxtrain.models.bert import Bert, BertConfig, inference, init_params  # noqa: E402
from jaxtrain.models.registry import TEXT_ENCODER  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}
TINY = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 24, "type_vocab_size": 2}


def _hf_bert(seed: int = 0, cls=None, **kwargs):
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**TINY, **kwargs})
    config._attn_implementation = "eager"
    model = (cls or transformers.BertModel)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _inputs(seed: int = 1, b: int = 3, t: int = 12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], (b, t)).astype(np.int32)
    types = np.zeros((b, t), np.int32)
    types[:, t // 2:] = 1  # a sentence pair
    lengths = np.array([t, t - 4, 3])[:b]
    mask = np.arange(t)[None] < lengths[:, None]
    tokens = np.where(mask, tokens, 0)
    return tokens, types, mask


def _torch_hidden(model, tokens, types, mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    token_type_ids=torch.as_tensor(types, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ours(cfg, params, tokens, types, mask):
    hidden, pooled = Bert(cfg).apply({"params": params}, tokens, mask, types, return_pooled=True)
    return np.asarray(hidden), np.asarray(pooled)


def test_load_hf_matches_bert_model(tmp_path):
    model = _hf_bert()
    model.save_pretrained(tmp_path)
    cfg, params = hf_bert.load_hf(str(tmp_path))
    assert cfg.add_pooler and cfg.num_layers == 2 and cfg.layer_norm_eps == 1e-12
    tokens, types, mask = _inputs()
    hidden, pooled = _ours(cfg, params, tokens, types, mask)
    want_hidden, want_pooled = _torch_hidden(model, tokens, types, mask)
    np.testing.assert_allclose(hidden[mask], want_hidden[mask], **TOL)
    np.testing.assert_allclose(pooled, want_pooled, **TOL)
    assert hf_bert.data_settings(str(tmp_path)) == {}


def test_save_hf_round_trip_loads_in_transformers(tmp_path):
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=48, max_position_embeddings=24, add_pooler=True,
                     hidden_act="gelu_new")
    params = nn.unbox(init_params(cfg, jax.random.key(3)))
    # perturb norms / biases away from 1 / 0
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys, strict=True)])
    hf_bert.save_hf(tmp_path, params, cfg)
    model = transformers.BertModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens, types, mask = _inputs(2)
    hidden, pooled = _ours(cfg, params, tokens, types, mask)
    want_hidden, want_pooled = _torch_hidden(model, tokens, types, mask)
    np.testing.assert_allclose(hidden[mask], want_hidden[mask], **TOL)
    np.testing.assert_allclose(pooled, want_pooled, **TOL)
    cfg2, params2 = hf_bert.load_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))
    ours, theirs = hf_bert.transformers_outputs(tmp_path, cfg, params)
    np.testing.assert_allclose(ours["hidden"], theirs["hidden"], **TOL)


def test_bert_for_x_prefix_and_gamma_beta(tmp_path):
    """A BertForMaskedLM checkpoint (``bert.`` prefix, an MLM head, no pooler) with old
    ``gamma`` / ``beta`` LayerNorm names loads as its encoder."""
    model = _hf_bert(cls=transformers.BertForMaskedLM)
    model.save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    state = load_file(file)
    assert any(k.startswith("bert.") for k in state) and any(k.startswith("cls.") for k in state)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    save_file(renamed, file, metadata={"format": "pt"})
    cfg, params = hf_bert.load_hf(tmp_path)
    assert not cfg.add_pooler and "pooler" not in params
    tokens, types, mask = _inputs(3)
    hidden = np.asarray(Bert(cfg).apply({"params": params}, tokens, mask, types))
    with torch.no_grad():
        want = model.bert(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          token_type_ids=torch.as_tensor(types, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long)
                          ).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden[mask], want[mask], **TOL)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown BertConfig keys"):
        BertConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="tanh")
    with pytest.raises(ConfigError, match="config.model"):
        get_model("bert").config({"name": "bert", "num_layers": 0})
    with pytest.raises(ValueError, match="position_embedding_type"):
        hf_bert.config_from_hf({**TINY, "model_type": "bert",
                                "position_embedding_type": "relative_key"})
    model = _hf_bert(num_hidden_layers=1)
    model.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "num_hidden_layers": 2}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="missing keys"):
        hf_bert.load_hf(tmp_path)


def test_family_padding_and_flops():
    family = get_model("bert")
    assert family.kind == TEXT_ENCODER and family.hf_module == "jaxtrain.hf.bert"
    cfg = family.config({"name": "bert", "vocab_size": 50, "hidden_size": 16, "num_layers": 1,
                         "num_heads": 2, "intermediate_size": 32,
                         "max_position_embeddings": 16})
    params = nn.unbox(family.init(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (2, 10)).astype(np.int32)
    padded = tokens.copy()
    padded[1, 6:] = -1
    out = family.inference(cfg, params, {"tokens": padded})
    alone = family.inference(cfg, params, {"tokens": padded[1:, :6]})
    # a right-padded row's real positions equal the unpadded row's
    np.testing.assert_allclose(out["hidden"][1, :6], alone["hidden"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["cls"], out["hidden"][:, 0])
    remat = family.inference(dataclasses.replace(cfg, remat=True), params, {"tokens": padded})
    np.testing.assert_allclose(remat["hidden"], out["hidden"], rtol=1e-6, atol=1e-6)
    assert inference(cfg, params, {"tokens": tokens})["hidden"].shape == (2, 10, 16)
    # the formula against a hand count: 6 * 1 * (4*16^2 + 2*16*32) + 12 * 1 * 16 * 10
    assert family.flops_per_token(cfg, 10) == 6 * (4 * 256 + 2 * 512) + 12 * 16 * 10
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
    big = dataclasses.replace(cfg, add_pooler=True)
    assert big.num_params() == sum(
        x.size for x in jax.tree.leaves(nn.unbox(init_params(big, jax.random.key(0)))))
