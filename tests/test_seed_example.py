"""The seed's example (section 6), reproduced exactly: B=2, D=4, num_layers=2, AdaGrad, fp32."""

from __future__ import annotations

from estimator import estimate, load_config


def test_default_config_is_the_seed_example() -> None:
    cfg = load_config()
    assert (cfg.model.dim, cfg.model.num_layers, cfg.training.batch_size) == (4, 2, 2)
    assert cfg.optimizer.name == "adagrad" and cfg.training.precision == "fp32"
    assert cfg.optimizer.option("lr") == 0.01  # the seed's AdaGrad(lr=0.01)


def test_seed_numbers() -> None:
    result = estimate(load_config(), device="cpu")
    # num_parameters = D*D*num_layers + D = 16*2 + 4
    assert result.parameters == 36
    memory = result.to_json()["memory"]
    # 4 bytes each: 36 params, B*D*num_layers = 16 activations, 36 grads, 36 g2 accumulators
    assert memory == {
        "parameters": 144,
        "activations": 64,
        "gradients": 144,
        "optimizer_state": 144,
        "total": 496,
        "optimizer_step_tensors": 12,  # torch.optim.Adagrad's float32 'step' per parameter tensor
    }
    flops = result.to_json()["flops"]
    assert flops["per_step"] == 6 * 2 * 36 == 432
    assert (flops["forward"], flops["backward"]) == (144, 288)
    # FlopCounterMode: the first layer needs no input gradient, 6BP - 2BD^2 = 432 - 64
    assert flops["matmul"] == 368


def test_seed_peak_is_exact() -> None:
    """Hand derivation of the steady-step peak on the CPU (confirmed by the tracker in tests/measure).

    Live before the step: 144 params + 32 x + 8 y + 144 g2 + 12 step = 340 bytes. After backward the
    grads (144) and the head output 'out' (8) and the loss buffer (8) are live: 500. In AdaGrad's
    for-loop step, 'std = sum.sqrt()' is held by a loop variable: while layer 1's std (64) is still
    referenced, layer 2's std (64) is allocated: 500 + 128 = 628.
    """
    result = estimate(load_config(), device="cpu")
    assert result.peak_bytes == 628
    assert result.first_step_peak_bytes == 628  # AdaGrad creates its state in the constructor
    assert result.step.steady_peak.phase == "optimizer_step"
