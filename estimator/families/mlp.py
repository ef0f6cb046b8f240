"""The seed's "Cruncher": ``num_layers`` bias-free D x D linear layers, a D -> 1 head, MSE loss.

Formulas are the seed's (section 6): parameters ``D·D·num_layers + D``, activations
``B·D·num_layers``, FLOPs ``6·B·P`` (forward 2·B·P, backward 4·B·P; Kaplan et al. 2020's
convention of 2 FLOPs per multiply-add). The exact matmul count is what FlopCounterMode reports for
``estimator.measure.mlp.Cruncher``: the first layer needs no input gradient (the input does not
require grad), so it is ``6·B·P − 2·B·D²``.

The events below follow what torch 2.13 allocates and frees for this model, observed with the
live-tensor tracker (docs/peak.md): each layer's output is saved for the next layer's backward;
backward computes a layer's weight gradient, then its input gradient, then frees the incoming
gradient and the saved input; AccumulateGrad keeps the computed gradient tensor itself.
"""

from __future__ import annotations

from estimator.config import MLPConfig, TrainingConfig
from estimator.events import Event, alloc, free
from estimator.families.base import FlopCount, ParamTensor, StepShape, register_family


@register_family("mlp")
class MLPFamily:
    name = "mlp"

    def parameters(self, model: MLPConfig) -> list[ParamTensor]:
        """``layers.{i}.weight`` (D, D) for each layer, then ``final.weight`` (D, 1)."""
        d = model.dim
        layers = [ParamTensor(f"layers.{i}.weight", (d, d)) for i in range(model.num_layers)]
        return [*layers, ParamTensor("final.weight", (d, 1))]

    def activation_elements(self, model: MLPConfig, batch: TrainingConfig) -> int:
        """The seed's ``B·D·num_layers``: one B x D output saved per layer."""
        return batch.batch_size * model.dim * model.num_layers

    def flops(self, model: MLPConfig, batch: TrainingConfig) -> FlopCount:
        """6·B·P (the seed) and the exact matmul count 6·B·P − 2·B·D² (no first-layer input grad)."""
        b, d = batch.batch_size, model.dim
        p = d * d * model.num_layers + d
        return FlopCount(
            forward=2 * b * p,
            backward=4 * b * p,
            matmul=6 * b * p - 2 * b * d * d,
            matmul_forward=2 * b * p,
        )

    def input_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """x (B, D) and the target y (B,), in the parameter dtype (autocast casts x inside)."""
        b, d, e = batch.batch_size, model.dim, shape.parameter_bytes
        return [alloc("x", "input", b * d * e, "setup"), alloc("y", "input", b * e, "setup")]

    def forward_backward_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Forward, MSE loss and backward of one step, in the order torch runs them."""
        b, d, n = batch.batch_size, model.dim, model.num_layers
        act = shape.activation_bytes
        loss_bytes = shape.parameter_bytes  # mse_loss computes in the promoted (parameter) dtype
        ev: list[Event] = []
        if shape.autocast:
            # autocast casts the fp32 input and each weight to 16 bits once; the casts are cached
            # for the whole forward and saved by mm for backward.
            ev.append(alloc("x.16bit", "temporary", b * d * act, "forward"))
        for i in range(n):
            if shape.autocast:
                ev.append(alloc(f"layers.{i}.weight.16bit", "temporary", d * d * act, "forward"))
            ev.append(alloc(f"h{i + 1}", "activation", b * d * act, "forward"))
        if shape.autocast:
            ev.append(alloc("final.weight.16bit", "temporary", d * act, "forward"))
        ev.append(alloc("out", "activation", b * act, "forward"))
        # mse_loss keeps its result as a view of a B-element buffer (measured); it runs in fp32 under
        # autocast (mse_loss is on autocast's fp32 list), casting the 16-bit output first.
        if shape.autocast:
            ev.append(alloc("out.fp32", "temporary", b * loss_bytes, "loss"))
        ev.append(alloc("loss", "temporary", b * loss_bytes, "loss"))
        ev.append(alloc("grad_loss", "temporary", loss_bytes, "backward"))
        ev.append(alloc("grad_out", "temporary", b * loss_bytes, "backward"))
        ev.extend(self._backward(model, batch, shape))
        ev.append(free("grad_loss", "temporary", loss_bytes, "backward"))
        return ev

    def _backward(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        b, d, n = batch.batch_size, model.dim, model.num_layers
        act, grad = shape.activation_bytes, shape.gradient_bytes
        loss_bytes = shape.parameter_bytes
        ev: list[Event] = []
        # The head: weight grad, then the input grad; then the incoming grad and saved h_n go.
        ev.append(alloc("final.weight.grad", "gradient", d * grad, "backward"))
        ev.append(alloc(f"grad_h{n}", "temporary", b * d * act, "backward"))
        ev.append(free("grad_out", "temporary", b * loss_bytes, "backward"))
        if shape.autocast:
            ev.append(free("out.fp32", "temporary", b * loss_bytes, "backward"))
            ev.append(free("final.weight.16bit", "temporary", d * act, "backward"))
        ev.append(free(f"h{n}", "activation", b * d * act, "backward"))
        for i in range(n - 1, -1, -1):
            ev.append(alloc(f"layers.{i}.weight.grad", "gradient", d * d * grad, "backward"))
            if i > 0:
                ev.append(alloc(f"grad_h{i}", "temporary", b * d * act, "backward"))
            ev.append(free(f"grad_h{i + 1}", "temporary", b * d * act, "backward"))
            if shape.autocast:
                ev.append(free(f"layers.{i}.weight.16bit", "temporary", d * d * act, "backward"))
            if i > 0:
                ev.append(free(f"h{i}", "activation", b * d * act, "backward"))
        if shape.autocast:
            ev.append(free("x.16bit", "temporary", b * d * act, "backward"))
        return ev

    def end_of_step_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """The step's output and loss, held by the caller until the step is over."""
        b, act = batch.batch_size, shape.activation_bytes
        return [free("out", "activation", b * act, "zero_grad"),
                free("loss", "temporary", b * shape.parameter_bytes, "zero_grad")]
