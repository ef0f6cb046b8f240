"""Conformance suite (issue 11): third-party architectures traced on fake tensors against the real CPU step.

Every case is a ``model.module`` config (the module family) naming one of the factories below: Hugging
Face transformers decoders, encoders, encoder-decoders and vision models, torchvision and timm CNNs
and ViTs, and plain-torch RNNs and transformers -- with and without activation checkpointing, with
frozen parts, in fp32, bf16 and autocast (amp-bf16). Small configurations (tiny widths, one or two
layers, 32x32 images), so the whole suite runs in minutes on 2 cores. For each case:

* **estimate**: ``estimate(config, "cpu")`` -- the module is traced on fake tensors (never run);
* **measured**: the real step as ``verify --device cpu`` measures it -- ``measure_uninstrumented``:
  a fresh model, the first and the steady step with only the profiler watching, the peak of the
  tensors ATen ops returned (docs/measurement.md, "Checked against the allocator"); AdamW.

It prints one line per case (steady-step peak estimated and measured, the difference in bytes and %,
the same for the first step) and a summary; ``--markdown`` prints the table docs/accuracy.md shows.

    python benchmarks/conformance.py                  # every case (about 10 minutes on 2 cores)
    python benchmarks/conformance.py --only gpt2 lstm # the cases whose name contains a word
    python benchmarks/conformance.py --list

**Installing timm and torchvision beside the pinned CPU torch.** transformers is in the project's test
extra. timm and torchvision are not (the suite skips their cases without them). PyPI's torchvision
0.28.0 is the release for torch 2.13, but its wheel is built against CUDA torch: its ``_C.so`` needs
``libtorch_cuda.so``, which the CPU torch does not have, so the extension does not load and
``import torchvision`` then fails in ``torchvision/_meta_registrations.py``
(``RuntimeError: operator torchvision::nms does not exist``: ``register_fake("torchvision::nms")`` is
the one registration there not guarded by ``extension._has_ops()``). timm imports torchvision, so it
fails the same way. What works, in a virtual environment that leaves the project's pinned setup alone::

    python -m venv --system-site-packages .venv-conformance
    .venv-conformance/bin/pip install --no-deps timm torchvision==0.28.0
    .venv-conformance/bin/python benchmarks/conformance.py

:func:`import_torchvision` then declares the schemas of ``torchvision::nms`` and ``torchvision::qnms``
(no kernels) before importing torchvision, so that registration finds its operator. torchvision's
compiled ops (NMS, RoI align, deformable convolution) stay unavailable; the classification models
here use none of them. (The alternative, a CUDA build of torch 2.14 with its torchvision, is about
5.5 GB and was not needed.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
_TORCHVISION_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARIES: list[Any] = []  # keeps the schema library alive


# --------------------------------------------------------------------------- factories (model.module targets)
def import_torchvision() -> Any:
    """``import torchvision``, declaring its NMS schemas first where its CUDA-built extension cannot load."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    import torch

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    if not _LIBRARIES:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _TORCHVISION_SCHEMAS:
            lib.define(schema)
        _LIBRARIES.append(lib)
    return importlib.import_module("torchvision")


def _freeze(model: Any, prefixes: list[str] | None) -> Any:
    for name, p in model.named_parameters():
        if prefixes and any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
    return model


def hf_model(model_type: str, head: str = "causal_lm", checkpointing: bool = False, freeze: list[str] | None = None,
             attn: str = "sdpa", **config: Any) -> Any:
    """A transformers model from a config (``AutoConfig.for_model``), randomly initialised, in training mode.

    ``head``: causal_lm | masked_lm | seq2seq (forward(input_ids, decoder_input_ids) -> logits) | image.
    ``checkpointing``: ``gradient_checkpointing_enable(use_reentrant=False)``. ``freeze``: parameter-name
    prefixes that get ``requires_grad=False``.
    """
    import torch

    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # transformers imports it when installed (image processors)
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **config)
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "image": transformers.AutoModelForImageClassification}[head]
    model = auto.from_config(cfg, attn_implementation=attn)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _freeze(model, freeze)
    if head != "seq2seq":
        return model

    class EncoderDecoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids: Any, decoder_input_ids: Any) -> Any:
            return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits

    return EncoderDecoder(model)


def timm_model(name: str, checkpointing: bool = False, freeze: list[str] | None = None, **kwargs: Any) -> Any:
    """``timm.create_model(name, pretrained=False, **kwargs)``; ``set_grad_checkpointing`` if asked."""
    import_torchvision()
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpointing:
        model.set_grad_checkpointing(True)
    return _freeze(model, freeze)


def tv_model(name: str, freeze: list[str] | None = None, **kwargs: Any) -> Any:
    """A torchvision classification model: ``torchvision.models.<name>(**kwargs)``, or a small ConvNeXt
    (``name='convnext'``, ``channels``/``depths``) or Swin (``name='swin'``, ``embed_dim``/``depths``/
    ``heads``/``window``) built from torchvision's classes."""
    tv = import_torchvision()
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        channels, depths = kwargs.pop("channels"), kwargs.pop("depths")
        setting = [CNBlockConfig(c, channels[i + 1] if i + 1 < len(channels) else None, d)
                   for i, (c, d) in enumerate(zip(channels, depths, strict=True))]
        return _freeze(ConvNeXt(setting, **kwargs), freeze)
    if name == "swin":
        from torchvision.models.swin_transformer import SwinTransformer

        return _freeze(SwinTransformer(patch_size=[4, 4], embed_dim=kwargs.pop("embed_dim"),
                                       depths=kwargs.pop("depths"), num_heads=kwargs.pop("heads"),
                                       window_size=[kwargs.pop("window")] * 2, **kwargs), freeze)
    return _freeze(getattr(tv.models, name)(**kwargs), freeze)


def torch_model(kind: str, checkpointing: bool = False, **kwargs: Any) -> Any:
    """Plain torch: ``lstm_lm`` / ``gru_lm`` (embedding, recurrent layers, head), ``encoder``
    (``nn.TransformerEncoder`` over embeddings), ``checkpointed_mlp`` (``torch.utils.checkpoint`` per block)."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    vocab, dim = kwargs.get("vocab", 64), kwargs.get("dim", 32)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            if kind == "encoder":
                layer = nn.TransformerEncoderLayer(dim, kwargs.get("heads", 4), 2 * dim, batch_first=True)
                self.body = nn.TransformerEncoder(layer, kwargs.get("layers", 2), enable_nested_tensor=False)
            else:
                cls = nn.LSTM if kind == "lstm_lm" else nn.GRU
                self.body = cls(dim, dim, num_layers=kwargs.get("layers", 2), batch_first=True,
                                bidirectional=kwargs.get("bidirectional", False))
            width = dim * (2 if kwargs.get("bidirectional") else 1)
            self.head = nn.Linear(width, vocab)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            h = self.body(self.emb(idx))
            return self.head(h if kind == "encoder" else h[0])

    class CheckpointedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                        for _ in range(kwargs.get("layers", 3)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = x + (checkpoint(block, x, use_reentrant=False) if checkpointing else block(x))
            return x

    return CheckpointedMLP() if kind == "checkpointed_mlp" else LM()


# --------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    name: str
    source: str  # transformers | torchvision | timm | torch
    factory: str
    kwargs: dict[str, Any]
    inputs: list[dict[str, Any]]
    precision: str = "fp32"
    loss: str = "cross_entropy"
    note: str = ""
    requires: tuple[str, ...] = field(default=())

    def model(self) -> dict[str, Any]:
        return {"module": f"conformance:{self.factory}", "kwargs": self.kwargs, "inputs": self.inputs,
                "loss": self.loss, "search_dir": str(HERE)}


def _tokens(vocab: int, batch: int = 2, seq: int = 16) -> list[dict[str, Any]]:
    return [{"shape": [batch, seq], "dtype": "int64", "high": vocab}]


IMAGES = [{"shape": [2, 3, 32, 32]}]
V = 128
DEC = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
ENC = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)
GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=2, num_labels=10)


def _hf(name: str, model_type: str, head: str, config: dict[str, Any], inputs: list[dict[str, Any]],
        precision: str = "fp32", note: str = "", **extra: Any) -> Case:
    return Case(name, "transformers", "hf_model", {"model_type": model_type, "head": head, **extra, **config},
                inputs, precision, note=note, requires=("transformers",))


CASES: list[Case] = [
    # ---- Hugging Face decoders
    _hf("gpt2", "gpt2", "causal_lm", GPT2,
        _tokens(V), note="dropout 0.1 (GPT-2's default), tied head"),
    _hf("gpt2 checkpointed", "gpt2", "causal_lm", GPT2,
        _tokens(V), checkpointing=True),
    _hf("gpt2 amp-bf16", "gpt2", "causal_lm", GPT2,
        _tokens(V), "amp-bf16"),
    _hf("llama GQA sdpa", "llama", "causal_lm", DEC, _tokens(V)),
    _hf("llama GQA eager", "llama", "causal_lm", DEC, _tokens(V), attn="eager"),
    _hf("llama GQA bf16", "llama", "causal_lm", DEC, _tokens(V), "bf16"),
    _hf("llama checkpointed", "llama", "causal_lm", DEC, _tokens(V), checkpointing=True),
    _hf("llama frozen embeddings", "llama", "causal_lm", DEC, _tokens(V), freeze=["model.embed_tokens"]),
    _hf("qwen2 GQA sdpa", "qwen2", "causal_lm", DEC, _tokens(V)),
    _hf("qwen2 amp-bf16", "qwen2", "causal_lm", DEC, _tokens(V), "amp-bf16"),
    _hf("mistral", "mistral", "causal_lm", DEC, _tokens(V)),
    _hf("phi3", "phi3", "causal_lm", {**DEC, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}, _tokens(V),
        note="fused qkv and gate_up"),
    _hf("gpt_neox", "gpt_neox", "causal_lm", ENC, _tokens(V), note="fused qkv"),
    _hf("gemma", "gemma", "causal_lm", {**DEC, "head_dim": 16}, _tokens(V)),
    # ---- encoders
    _hf("bert", "bert", "masked_lm", ENC, _tokens(V)),
    _hf("bert frozen embeddings", "bert", "masked_lm", ENC, _tokens(V), freeze=["bert.embeddings"]),
    _hf("bert amp-bf16", "bert", "masked_lm", ENC, _tokens(V), "amp-bf16"),
    _hf("roberta", "roberta", "masked_lm", {**ENC, "max_position_embeddings": 80}, _tokens(V)),
    # ---- encoder-decoders
    _hf("t5", "t5", "seq2seq", dict(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
        _tokens(V) + _tokens(V, seq=8)),
    _hf("bart", "bart", "seq2seq", dict(vocab_size=V, d_model=64, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                        decoder_ffn_dim=128, max_position_embeddings=64),
        _tokens(V) + _tokens(V, seq=8)),
    # ---- vision (transformers)
    _hf("hf vit", "vit", "image", VIT, IMAGES),
    _hf("hf vit checkpointed", "vit", "image", VIT, IMAGES, checkpointing=True),
    _hf("hf swin", "swin", "image", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4, num_labels=10), IMAGES),
    _hf("hf convnext", "convnext", "image", dict(image_size=32, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                                 num_labels=10), IMAGES, attn="eager", note="no attention"),
    # ---- torchvision
    Case("tv resnet18", "torchvision", "tv_model", {"name": "resnet18", "num_classes": 10}, IMAGES,
         requires=("torchvision",)),
    Case("tv resnet18 amp-bf16", "torchvision", "tv_model", {"name": "resnet18", "num_classes": 10}, IMAGES,
         "amp-bf16", requires=("torchvision",)),
    Case("tv resnet18 frozen backbone", "torchvision", "tv_model",
         {"name": "resnet18", "num_classes": 10, "freeze": ["conv1", "bn1", "layer1", "layer2", "layer3"]}, IMAGES,
         requires=("torchvision",)),
    Case("tv mobilenet_v3_small", "torchvision", "tv_model", {"name": "mobilenet_v3_small", "num_classes": 10},
         IMAGES, requires=("torchvision",)),
    Case("tv VisionTransformer", "torchvision", "tv_model",
         {"name": "VisionTransformer", "image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2,
          "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10}, IMAGES, note="trunc_normal_ in __init__",
         requires=("torchvision",)),
    Case("tv VisionTransformer bf16", "torchvision", "tv_model",
         {"name": "VisionTransformer", "image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2,
          "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10}, IMAGES, "bf16", requires=("torchvision",)),
    Case("tv convnext", "torchvision", "tv_model", {"name": "convnext", "channels": [16, 32], "depths": [1, 1],
                                                     "num_classes": 10, "stochastic_depth_prob": 0.1}, IMAGES,
         requires=("torchvision",)),
    Case("tv swin", "torchvision", "tv_model", {"name": "swin", "embed_dim": 16, "depths": [1, 1], "heads": [1, 2],
                                                 "window": 4, "num_classes": 10}, IMAGES,
         requires=("torchvision",)),
    # ---- timm
    Case("timm vit drop-path", "timm", "timm_model",
         {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
          "num_heads": 2, "num_classes": 10, "drop_path_rate": 0.1}, IMAGES, note=".item() in __init__",
         requires=("timm", "torchvision")),
    Case("timm vit checkpointed", "timm", "timm_model",
         {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
          "num_heads": 2, "num_classes": 10, "checkpointing": True}, IMAGES, requires=("timm", "torchvision")),
    Case("timm deit amp-bf16", "timm", "timm_model",
         {"name": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
          "num_heads": 2, "num_classes": 10}, IMAGES, "amp-bf16", requires=("timm", "torchvision")),
    Case("timm convnext", "timm", "timm_model",
         {"name": "convnext_atto", "depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 10,
          "drop_path_rate": 0.1}, IMAGES, requires=("timm", "torchvision")),
    Case("timm resnet", "timm", "timm_model", {"name": "resnet10t", "num_classes": 10}, IMAGES,
         requires=("timm", "torchvision")),
    Case("timm mobilenetv3", "timm", "timm_model", {"name": "mobilenetv3_small_050", "num_classes": 10}, IMAGES,
         requires=("timm", "torchvision")),
    Case("timm efficientnet", "timm", "timm_model", {"name": "efficientnet_b0", "num_classes": 10}, IMAGES,
         requires=("timm", "torchvision")),
    # ---- plain torch
    Case("torch lstm lm", "torch", "torch_model", {"kind": "lstm_lm", "layers": 2}, _tokens(64)),
    Case("torch lstm bidirectional", "torch", "torch_model", {"kind": "lstm_lm", "layers": 1, "bidirectional": True},
         _tokens(64)),
    Case("torch gru lm bf16", "torch", "torch_model", {"kind": "gru_lm", "layers": 2}, _tokens(64), "bf16"),
    Case("torch TransformerEncoder", "torch", "torch_model", {"kind": "encoder"}, _tokens(64)),
    Case("torch checkpointed mlp", "torch", "torch_model", {"kind": "checkpointed_mlp", "checkpointing": True},
         [{"shape": [8, 32]}], loss="mse"),
]


# --------------------------------------------------------------------------- running
@dataclass
class Outcome:
    case: Case
    estimate: int = 0
    measured: int = 0
    first_estimate: int = 0
    first_measured: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def diff(self) -> int:
        return self.estimate - self.measured

    @property
    def pct(self) -> float:
        return 100.0 * self.diff / self.measured if self.measured else 0.0


def available(case: Case) -> str | None:
    """None if the case can run here, else why not."""
    for package in case.requires:
        try:
            if package == "torchvision":
                import_torchvision()
            else:
                importlib.import_module(package)
        except Exception as exc:  # ImportError, or torchvision's extension
            return f"{package} not importable ({type(exc).__name__})"
    return None


def run_case(case: Case, optimizer: str = "adamw") -> Outcome:
    """Estimate (trace) and measure (the real uninstrumented step, as verify --device cpu) one case."""
    import torch

    from estimator.api import estimate
    from estimator.errors import EstimatorError
    from estimator.loader import validate_config
    from estimator.measure.models import optimizer_factory, step_parts
    from estimator.measure.step import measure_uninstrumented

    started = time.perf_counter()
    outcome = Outcome(case)
    try:
        cfg = validate_config({"model": case.model(), "training": {"precision": case.precision},
                               "optimizer": {"name": optimizer}})
        est = estimate(cfg, "cpu")
        device = torch.device("cpu")
        parts = step_parts(cfg, device)
        real = measure_uninstrumented(parts.build_model, parts.make_batch, parts.loss_fn, optimizer_factory(cfg),
                                      device, parts.autocast_dtype)
    except EstimatorError as exc:
        outcome.error = str(exc)
    else:
        outcome.estimate, outcome.measured = est.peak_bytes, real.steady_step.peak_bytes
        outcome.first_estimate, outcome.first_measured = est.first_step_peak_bytes, real.first_step.peak_bytes
    outcome.seconds = time.perf_counter() - started
    return outcome


def _line(o: Outcome) -> str:
    c = o.case
    if o.error:
        return f"{c.name:30s} {c.precision:8s} ERROR {o.error}"
    first = o.first_estimate - o.first_measured
    return (f"{c.name:30s} {c.precision:8s} {o.estimate:>12,} {o.measured:>12,} {o.diff:>+9,} {o.pct:>+7.2f}%"
            f"   first {first:>+9,}   {o.seconds:5.1f} s")


def _markdown(outcomes: list[Outcome]) -> str:
    rows = ["| case | source | precision | estimate (B) | measured (B) | difference | first step | note |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for o in outcomes:
        c = o.case
        if o.error:
            rows.append(f"| {c.name} | {c.source} | {c.precision} | error | | | | {o.error} |")
            continue
        first = o.first_estimate - o.first_measured
        rows.append(f"| {c.name} | {c.source} | {c.precision} | {o.estimate:,} | {o.measured:,} | "
                    f"{o.diff:+,} B ({o.pct:+.2f}%) | {first:+,} B | {c.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or any(word in c.name for word in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name:30s} {c.source:12s} {c.precision:8s} {c.factory}({c.kwargs})")
        return 0
    import torch

    print(f"torch {torch.__version__}, {len(cases)} cases; steady-step peak: estimate, measured, difference")
    outcomes, skipped = [], []
    for case in cases:
        why = available(case)
        if why:
            skipped.append(f"{case.name}: {why}")
            continue
        outcome = run_case(case)
        print(_line(outcome), flush=True)
        outcomes.append(outcome)
    exact = sum(1 for o in outcomes if not o.error and o.diff == 0 and o.first_estimate == o.first_measured)
    within = sum(1 for o in outcomes if not o.error and abs(o.pct) <= 1.0)
    errors = sum(1 for o in outcomes if o.error)
    print(f"{len(outcomes)} run: {exact} exact (both peaks), {within} within 1%, {errors} failed; "
          f"{len(skipped)} skipped")
    for line in skipped:
        print(f"  skipped {line}")
    if args.markdown:
        print(_markdown(outcomes))
    return 0 if errors == 0 and within == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
