"""Shapes and sizes of every model."""

import pytest
import torch

from workloads.config import TrainConfig
from workloads.jobs import get_job
from workloads.models import build_model, count_params, input_shape
from workloads.models.gpt import GPT, GPTConfig


@pytest.mark.parametrize(
    "model, shape, params",
    [
        # conv 3*64*9+64, conv 64*128*9+128, fc 4608*1024+1024, fc 1024*10+10
        ("seed_cnn", (3, 24, 24), 1792 + 73856 + 4719616 + 10250),
        # conv 320, 18496, 73856; fc 8192*1000+1000; fc 1000*10+10
        ("seed_convnet", (1, 64, 64), 320 + 18496 + 73856 + 8193000 + 10010),
    ],
)
def test_classifier_shapes_and_sizes(model, shape, params):
    cfg = TrainConfig(model=model, epochs=1)
    net = build_model(cfg)
    assert input_shape(cfg) == shape
    assert count_params(net) == params
    assert net(torch.zeros(5, *shape)).shape == (5, 10)


def test_seed_convnet_width_shrinks_every_layer():
    narrow = build_model(TrainConfig(model="seed_convnet", width=0.25, epochs=1))
    assert narrow.conv1.out_channels == 8 and narrow.fc1.out_features == 250
    assert narrow(torch.zeros(2, 1, 64, 64)).shape == (2, 10)


def test_gpt_logits_shape_and_tied_embeddings():
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32))
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 64, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 64  # change only the future
    assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-6)


def test_gpt_124m_job_has_gpt2_small_size():
    cfg = get_job("gpt-124m")
    with torch.device("meta"):
        model = build_model(cfg)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert 123_000_000 < count_params(model) < 125_000_000


def test_gpt_rejects_sequence_longer_than_block():
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("bad", [{"n_embd": 30, "n_head": 4}, {"n_layer": 0}, {"dropout": 1.0}])
def test_gpt_config_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        GPTConfig(**bad)
