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
from estimator.families.base import BatchInForce, FlopCount, ParamTensor, StepShape, register_family


@register_family("mlp")
class MLPFamily:
    name = "mlp"
    #: what ``memory.activations`` counts, in the words of the explanations
    activation_description = "the seed's B·D·layers"

    def parameters(self, model: MLPConfig) -> list[ParamTensor]:
        """``layers.{i}.weight`` (D, D) for each layer, then ``final.weight`` (D, 1)."""
        d = model.dim
        layers = [ParamTensor(f"layers.{i}.weight", (d, d)) for i in range(model.num_layers)]
        return [*layers, ParamTensor("final.weight", (d, 1))]

    def activation_elements(self, model: MLPConfig, batch: TrainingConfig) -> int:
        """The seed's ``B·D·num_layers``: one B x D output saved per layer."""
        return batch.batch_size * model.dim * model.num_layers

    def activation_bytes(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> int:
        """The seed's activation term, ``B·D·num_layers`` elements of the activation dtype.

        Kept as the seed defines it (section 6; the seed's example: 64 bytes). What autograd really
        saves adds the head's output, which ``mse_loss`` keeps (and under autocast the 16-bit copies
        of the weights and input): that figure is ``saved_activations`` (72 bytes for the seed).
        """
        return self.activation_elements(model, batch) * shape.activation_bytes

    def batch_in_force(self, model: MLPConfig, batch: TrainingConfig) -> BatchInForce:
        """B is ``training.batch_size``; the MLP has no sequence dimension."""
        return BatchInForce(batch.batch_size, None, "training.batch_size")

    def flops(self, model: MLPConfig, batch: TrainingConfig) -> FlopCount:
        """6·B·P (the seed) and the exact matmul count 6·B·P − 2·B·D² (no first-layer input grad)."""
        b, d = batch.batch_size, model.dim
        p = d * d * model.num_layers + d
        return FlopCount(
            forward=2 * b * p,
            backward=4 * b * p,
            matmul=6 * b * p - 2 * b * d * d,
            matmul_forward=2 * b * p,
            tokens=b,
            rule_parameters=p,
        )

    def input_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """x (B, D) and the target y (B,), in the parameter dtype (autocast casts x inside)."""
        b, d, e = batch.batch_size, model.dim, shape.parameter_bytes
        return [alloc("x", "input", b * d * e, "setup"), alloc("y", "input", b * e, "setup")]

    def forward_backward_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Forward, MSE loss and backward of one step, in the order torch runs them.

        Under autocast (forward and loss inside ``torch.autocast``, backward outside, the AMP recipe)
        each weight and the input are cast to 16 bits; every cast but the first layer's weight is
        saved for backward (the input needs no gradient), so that one goes when autocast exits and
        clears its cache. ``mse_loss`` runs in fp32 under autocast, on an fp32 copy of the output.
        """
        b, d, n = batch.batch_size, model.dim, model.num_layers
        act, amp = shape.activation_bytes, shape.autocast
        full = shape.parameter_bytes  # the loss is computed in the parameter dtype (fp32 under autocast)
        ev: list[Event] = []
        for i in range(n):
            if amp:
                # saved by mm for the input gradient, except the first layer's (its input needs none)
                role = "temporary" if i == 0 else "activation"
                ev.append(alloc(f"layers.{i}.weight.16bit", role, d * d * act, "forward"))
                if i == 0:
                    ev.append(alloc("x.16bit", "activation", b * d * act, "forward"))
            ev.append(alloc(f"h{i + 1}", "activation", b * d * act, "forward"))
        if amp:
            ev.append(alloc("final.weight.16bit", "activation", d * act, "forward"))
        # mse_loss saves its input: the output itself, or under autocast its fp32 copy
        ev.append(alloc("out", "temporary" if amp else "activation", b * act, "forward"))
        if amp:
            ev.append(alloc("out.fp32", "activation", b * full, "loss"))
        ev.append(alloc("loss", "temporary", b * full, "loss"))  # a view of a B-element buffer (measured)
        if amp:
            ev.append(free("layers.0.weight.16bit", "temporary", d * d * act, "loss"))
        ev.append(alloc("grad_loss", "temporary", full, "backward"))
        ev.append(alloc("grad_out", "temporary", b * full, "backward"))
        if amp:
            ev.append(free("out.fp32", "activation", b * full, "backward"))
            ev.append(alloc("grad_out.16bit", "temporary", b * act, "backward"))
            ev.append(free("grad_out", "temporary", b * full, "backward"))
        ev.extend(self._backward(model, batch, shape))
        ev.append(free("grad_loss", "temporary", full, "backward"))
        return ev

    def _backward(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """Each layer from the head down: weight grad, input grad, then the frees (torch's order)."""
        b, d, n = batch.batch_size, model.dim, model.num_layers
        act, amp = shape.activation_bytes, shape.autocast
        grad = shape.gradient_bytes
        ev: list[Event] = []
        layers = [("final.weight", d, f"h{n}", "grad_out.16bit" if amp else "grad_out", b * (act if amp else
                                                                                          shape.parameter_bytes))]
        layers += [(f"layers.{i}.weight", d * d, f"h{i}" if i else "x.16bit" if amp else None, f"grad_h{i + 1}",
                    b * d * act) for i in range(n - 1, -1, -1)]
        for name, numel, saved_input, incoming, incoming_bytes in layers:
            ev.append(alloc(f"{name}.grad{'.16bit' if amp else ''}", "temporary" if amp else "gradient",
                            numel * (act if amp else grad), "backward"))
            if saved_input is not None and saved_input != "x.16bit":
                ev.append(alloc(f"grad_{saved_input}", "temporary", b * d * act, "backward"))
            ev.append(free(incoming, "temporary", incoming_bytes, "backward"))
            if amp and name != "layers.0.weight":
                ev.append(free(f"{name}.16bit", "activation", numel * act, "backward"))
            if saved_input is not None:
                ev.append(free(saved_input, "activation", b * d * act, "backward"))
            if amp:  # the 16-bit weight gradient is cast to the fp32 parameter's dtype, then dropped
                ev.append(alloc(f"{name}.grad", "gradient", numel * grad, "backward"))
                ev.append(free(f"{name}.grad.16bit", "temporary", numel * act, "backward"))
        return ev

    def end_of_step_events(self, model: MLPConfig, batch: TrainingConfig, shape: StepShape) -> list[Event]:
        """The step's output and loss, held by the caller until the step is over."""
        b, act = batch.batch_size, shape.activation_bytes
        return [free("out", "temporary" if shape.autocast else "activation", b * act, "zero_grad"),
                free("loss", "temporary", b * shape.parameter_bytes, "zero_grad")]
