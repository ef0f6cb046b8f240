"""The analytic families against the real transformers model, per covered model_type (docs/hf.md).

For each tiny config of ``tests/hf/tiny_configs.py`` and each precision, the steady-step peak, the
first-step peak and the bytes saved for backward of the analytic estimate (``engine: analytic``)
and of the transformers model traced on fake tensors (``engine: transformers``), on the CPU
(exact bytes), B=2, S=16 (``--seq-len``), AdamW. With ``--verify``, the real transformers step is also measured.

    python benchmarks/hf_agreement.py                       # fp32, bf16, amp-bf16
    python benchmarks/hf_agreement.py --types gpt2 llama --precisions fp32 --verify
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from estimator.api import estimate  # noqa: E402
from estimator.loader import load_config  # noqa: E402
from tests.hf.tiny_configs import TINY_CONFIGS  # noqa: E402


def config_for(path: Path, engine: str, precision: str, extra: list[str], seq_len: int = 16) -> object:
    return load_config(None, [f"model.engine={engine}", f"training.seq_len={seq_len}", "training.batch_size=2",
                              f"training.precision={precision}", "optimizer.name=adamw", "device=cpu", *extra],
                       base={"model": {"hf_config": str(path)}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", nargs="*", default=list(TINY_CONFIGS))
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16", "amp-bf16"])
    parser.add_argument("--set", nargs="*", default=[], dest="sets", help="extra overrides (both engines)")
    parser.add_argument("--hf-config", nargs="*", default=[], help="extra model.config.k=v for the tiny config")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--verify", action="store_true", help="also measure the transformers step (slow)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.types:
            values = dict(TINY_CONFIGS[model_type])
            for item in args.hf_config:
                key, _, raw = item.partition("=")
                values[key] = json.loads(raw)
            path = Path(tmp) / model_type / "config.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
            for precision in args.precisions:
                a = estimate(config_for(path, "analytic", precision, args.sets, args.seq_len))
                hf_cfg = config_for(path, "transformers", precision, args.sets, args.seq_len)
                h = estimate(hf_cfg)
                row = {"type": model_type, "precision": precision, "params": [a.parameters, h.parameters],
                       "peak": [a.peak_bytes, h.peak_bytes], "first": [a.first_step_peak_bytes,
                                                                      h.first_step_peak_bytes],
                       "saved": [a.saved_activations, h.saved_activations],
                       "inputs": [a.input_bytes, h.input_bytes], "matmul": [a.flops.matmul, h.flops.matmul]}
                if args.verify:  # the real transformers step, measured
                    from estimator.measure.verify import run_verify

                    v = run_verify(hf_cfg, "cpu")
                    row["measured_peak"] = v.measurement.real_steady_step.peak_bytes - v.measurement.baseline_bytes
                rows.append(row)
                diff = h.peak_bytes - a.peak_bytes
                print(f"{model_type:12} {precision:9} params {a.parameters}/{h.parameters} peak analytic "
                      f"{a.peak_bytes:,} transformers {h.peak_bytes:,} ({diff:+,}, {diff / h.peak_bytes:+.2%}) "
                      f"saved {a.saved_activations:,}/{h.saved_activations:,} inputs {a.input_bytes}/{h.input_bytes}"
                      + (f" measured {row['measured_peak']:,}" if args.verify else ""), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
