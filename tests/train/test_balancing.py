"""The DeepSeek-V3 bias rule and the load summaries, on a generated model's own MoE layers."""

import pytest
import torch

import lmspec
from lmspec.train.balancing import load_fractions, max_over_uniform, update_correction_bias
from lmspec.train.losses import training_loss


@pytest.fixture(scope="module")
def model(examples_dir):
    torch.manual_seed(0)
    return lmspec.build(examples_dir / "mimo_v2_flash_tiny.yaml")


def test_sign_rule_moves_each_bias_towards_balance(model):
    layers = model.moe_layers()
    load = torch.tensor([[10.0, 0, 2, 4, 4, 4, 4, 4]] * len(layers))  # mean 4
    update_correction_bias(layers, load, 0.01)
    bias = layers[0].gate.e_score_correction_bias
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0, 0, 0, 0, 0])
    update_correction_bias(layers, load, 0.0)  # a stage with balancing off leaves it alone
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="MoE layers"):
        update_correction_bias(layers, load[:2], 0.01)


def test_biases_steer_routing_in_the_model(model):
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        before = model(x, labels=x).expert_load
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.zero_()[3] = 100.0  # expert 3 is always picked
        after = model(x, labels=x).expert_load
    assert before.shape == after.shape == (6, 8)
    assert torch.all(load_fractions(after)[:, 3] == 0.5)  # top-2: one of every token's two slots
    assert max_over_uniform(after) == pytest.approx(4.0)
    for layer in model.moe_layers():
        layer.gate.e_score_correction_bias.zero_()


def test_load_summaries():
    load = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    assert load_fractions(load).tolist() == [[0.75, 0.25], [0.5, 0.5]]
    assert max_over_uniform(load) == 1.5
    assert max_over_uniform(torch.zeros(0, 0)) == 1.0


def test_training_loss_weights(model):
    x = torch.randint(0, 256, (2, 33))
    out = model(x[:, :-1], labels=x[:, 1:])
    parts = training_loss(out, mtp_loss_weight=0.3, seq_aux_coef=0.01)
    expected = out.loss + 0.3 * torch.stack(out.mtp_losses).mean() + 0.01 * out.aux_loss
    assert torch.allclose(parts.total, expected)
    assert len(parts.mtp) == 3
