"""A family's parameter list is made once per model section (``families/memo.py``): each caller gets its own
list, equal to a fresh build, and another model section gets its own."""

from __future__ import annotations

from estimator import load_config
from estimator.families import memo, moe, transformer
from estimator.simulate import clear_caches, with_layers


def test_parameter_lists_are_made_once_per_model_and_handed_out_as_copies() -> None:
    for preset, module in (("llama-2-7b", transformer), ("mixtral-8x7b", moe)):
        cfg = load_config(None, [], base={"model": {"preset": preset}})
        first = module.parameter_tensors(cfg.model)
        first.append(first[0])  # a caller's own list: the next caller does not see it
        again = module.parameter_tensors(cfg.model)
        assert again == first[:-1] and again is not first
        clear_caches()  # forgets the lists too: a cold estimate builds them again, equal
        assert module.parameter_tensors(cfg.model) == again
        smaller = module.parameter_tensors(with_layers(cfg, 3).model)
        assert len(smaller) < len(again) and {p.name for p in smaller} < {p.name for p in again}
    assert memo.KEEP >= 6  # a fit's layer counts 2..5 and the model itself stay remembered together


def test_a_tensor_parallel_ranks_parameters_are_made_once_per_degree(monkeypatch) -> None:  # noqa: ANN001
    """The fit's TP alternative asks for a rank's local parameters many times (bounds, the rank's step, its
    optimizer state): one list per (model, degree), equal to what is built afresh."""
    from estimator import load_config
    from estimator.families import transformer
    from estimator.families.memo import clear_caches

    model = load_config(overrides=["model.preset=llama-2-7b", "model.num_layers=3"]).model
    clear_caches()
    first = transformer.sharded_parameter_tensors(model, 2)
    calls: list[str] = []
    monkeypatch.setattr(transformer, "parameter_tensors", lambda m: calls.append("built") or [])
    assert transformer.sharded_parameter_tensors(model, 2) == first and calls == []
    assert transformer.sharded_parameter_tensors(model, 4) == [] and calls == ["built"]  # another degree: built
    first.clear()  # a caller's list is its own
    assert len(transformer.sharded_parameter_tensors(model, 2)) == 3 * 9 + 3
