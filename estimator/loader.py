"""Reading a config file, applying ``--set`` overrides, and turning every problem into one line.

Errors are raised as :class:`EstimatorError` with one message per problem, each naming the field
path (``training.batch_size: must be greater than 0, got 0``), so the CLI can print them and exit 2.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from estimator.config import MODEL_SOURCE_KEYS, Config
from estimator.errors import EstimatorError
from estimator.names import did_you_mean

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than 1 MiB is refused unread (the largest shipped config is under 1 KiB)."""
MAX_ALIASES = 100
"""YAML aliases (``*name``) allowed in one document."""
MAX_EXPANDED_SIZE = 1_000_000
"""The largest document once every alias is expanded: one unit per value, plus one per string character.
Without aliases a document is bounded by its file size; with them, 9 levels of 9 aliases ("billion
laughs") would expand to 9^9 values when the config is serialised."""


class _Refused(Exception):
    """A YAML document that is well formed but refused (a duplicate key, too many aliases)."""


class _ConfigLoader:
    """``yaml.SafeLoader`` that refuses duplicate keys and more than :data:`MAX_ALIASES` aliases.

    Built lazily (``yaml`` is imported on first use); see :func:`safe_yaml_load`.
    """

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                aliases = 0

                def compose_node(self, parent: Any, index: Any) -> Any:
                    if self.check_event(yaml.AliasEvent):
                        self.aliases += 1
                        if self.aliases > MAX_ALIASES:
                            mark = self.peek_event().start_mark
                            raise _Refused(f"more than {MAX_ALIASES} YAML aliases (at line {mark.line + 1}); "
                                           "write the values out")
                    return super().compose_node(parent, index)

                def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                    seen: dict[Any, int] = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = self.construct_object(key_node, deep=True)
                        line = key_node.start_mark.line + 1
                        try:
                            duplicate = key in seen
                        except TypeError:  # an unhashable key: SafeConstructor reports it
                            continue
                        if duplicate:
                            raise _Refused(f"duplicate key {key!r} at line {line} (first given at line {seen[key]})")
                        seen[key] = line
                    return super().construct_mapping(node, deep)

            cls.cls = Loader
        return cls.cls


def safe_yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys and more than :data:`MAX_ALIASES` aliases.

    Raises ``yaml.YAMLError`` for malformed YAML and :class:`EstimatorError` (no path prefix; callers
    add theirs) for a document that is well formed but refused. Follow with :func:`check_values`.
    """
    import yaml

    try:
        data = yaml.load(text, Loader=_ConfigLoader.get())  # noqa: S506 -- a SafeLoader subclass
    except _Refused as exc:
        raise EstimatorError(str(exc)) from None
    except RecursionError:
        raise EstimatorError("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4,300-digit conversion limit
        raise EstimatorError(f"invalid value: {exc}") from None
    return data


def check_values(data: Any, root: str = "") -> None:
    """Refuse a parsed document that is cyclic, too large once aliases are expanded, or non-finite.

    Every float must be finite: NaN and infinities are not JSON (RFC 8259), and no option of any
    optimizer or model accepts them. The size is computed with one memo per shared object, so the
    check itself stays linear in the document as written.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(obj: Any, path: str) -> int:
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if isinstance(obj, float) and not math.isfinite(obj):
            raise EstimatorError(f"{path or 'config'}: expected a finite number, got {obj}")
        if isinstance(obj, (str, bytes)):
            return 1 + len(obj)
        if not isinstance(obj, (dict, list, tuple)):
            return 1
        if key in active:
            raise EstimatorError(f"{path or 'config'}: the document refers to itself (a cyclic YAML alias)")
        active.add(key)
        total = 1
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            child = f"{path}.{k}" if path else str(k)
            total += size(k, child) + size(v, child) if isinstance(obj, dict) else size(v, child)
            if total > MAX_EXPANDED_SIZE:
                raise EstimatorError(f"{path or 'config'}: larger than {MAX_EXPANDED_SIZE:,} values once its "
                                     f"YAML aliases are expanded; write it without aliases")
        active.discard(key)
        sizes[key] = total
        return total

    try:
        size(data, root)
    except RecursionError:
        raise EstimatorError(f"{root or 'config'}: nested too deeply") from None


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing duplicate keys (JSON allows them; the last would silently win)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Refused(f"duplicate key {key!r}")
        data[key] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping, with a one-line error for each failure."""
    import yaml

    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise EstimatorError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    if not exists:
        raise EstimatorError(f"config file not found: {p}")
    if is_dir:
        raise EstimatorError(f"config path is a directory, expected a YAML or JSON file: {p}")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise EstimatorError(f"{p}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few lines of YAML")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EstimatorError(f"cannot read config file {p}: {exc}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            data = safe_yaml_load(text)
    except json.JSONDecodeError as exc:
        raise EstimatorError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise EstimatorError(f"{p}: invalid YAML{where}: {problem}") from None
    except _Refused as exc:
        raise EstimatorError(f"{p}: {exc}") from None
    except (RecursionError, ValueError) as exc:
        raise EstimatorError(f"{p}: cannot parse: {'nested too deeply' if isinstance(exc, RecursionError) else exc}"
                             ) from None
    except EstimatorError as exc:
        raise EstimatorError(*(f"{p}: {problem}" for problem in exc.problems)) from None
    check_values(data)
    if data is None:
        raise EstimatorError(f"{p}: the file is empty; give at least one section (model:, training:, optimizer:), "
                             "or no file for the seed's example")
    if not isinstance(data, dict):
        raise EstimatorError(f"{p}: the top level must be a mapping (model:, training:, optimizer:), "
                             f"got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], c), the value parsed as YAML (``3`` is an int, ``true`` a bool)."""
    import yaml

    if "=" not in text:
        raise EstimatorError(f"--set {text}: expected PATH=VALUE, e.g. --set training.batch_size=8")
    key, _, raw = text.partition("=")
    path = [part.strip() for part in key.strip().split(".")]
    if not all(path):
        raise EstimatorError(f"--set {text}: the path {key!r} has an empty part")
    try:
        value = safe_yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except EstimatorError as exc:
        raise EstimatorError(*(f"--set {text}: {problem}" for problem in exc.problems)) from None
    check_values(value, ".".join(path))
    return path, value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """``data[path[0]][path[1]]... = value``, creating mappings on the way."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def check_override_path(data: dict[str, Any], path: list[str], text: str) -> None:
    """Refuse a ``--set`` path that names no field, judged on the final config (so that
    ``--set model.num_heads=8 --set model.preset=gpt2`` works in either order)."""
    from estimator.config import model_config_class

    model: type[BaseModel] | None = Config
    for depth, part in enumerate(path):
        if model is None:
            return
        fields: dict[str, Any] = dict(model.model_fields)
        if depth == 1 and path[0] == "model":
            fields.update(dict.fromkeys((*MODEL_SOURCE_KEYS, "engine")))
        if part not in fields:
            where = ".".join(path[:depth]) or "the config"
            raise EstimatorError(f"--set {text}: {where} has no field {part!r}"
                                 f"{did_you_mean(part, list(fields))} (fields: {', '.join(fields)})")
        if depth == 0 and part == "model":
            section = data.get("model")
            model = model_config_class(section if isinstance(section, dict) else {})
        else:
            annotation = getattr(fields[part], "annotation", None)
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Load a config (the seed's example when ``path`` is None), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    source_dir = Path.cwd()
    if path is not None:
        data = read_config_file(path)
        source_dir = Path(path).resolve().parent
    parsed = [(text, *parse_override(text)) for text in overrides or []]
    for _, keys, value in parsed:
        set_path(data, keys, value)
    for text, keys, _ in parsed:
        check_override_path(data, keys, text)
    config = validate_config(data, source_dir)
    training = data.get("training")
    if config.model.family == "module" and isinstance(training, dict) and "batch_size" in training:
        raise EstimatorError("training.batch_size: not used by the module family: the batch is the first "
                             "dimension of each model.inputs shape; change it there")
    return config


def validate_config(data: dict[str, Any], source_dir: Path | None = None) -> Config:
    """Validate a mapping into a :class:`Config`, every problem one line naming its field path."""
    from estimator.config import expand_model_section
    from estimator.hf_config import HF_SOURCE_KEYS, analytic_omissions, checkpoint_of
    from estimator.presets import apply_training_defaults

    data = dict(data)
    defaults = apply_training_defaults(data)  # a preset / hf_config model: AdamW, amp-bf16 unless given
    raw_model = data.get("model")
    if isinstance(raw_model, dict):
        data["model"] = expand_model_section(raw_model, source_dir or Path.cwd())
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise EstimatorError(*format_validation_error(exc)) from None
    config._training_defaults = defaults
    if isinstance(raw_model, dict) and any(key in raw_model for key in HF_SOURCE_KEYS):
        config._checkpoint = checkpoint_of(raw_model, source_dir or Path.cwd())  # safetensors headers beside it
        seq_len = config.training.seq_len or getattr(config.model, "max_seq_len", None)  # the S in force
        config._omissions = analytic_omissions(raw_model, source_dir or Path.cwd(), seq_len)
    return config


def format_validation_error(exc: ValidationError) -> list[str]:
    """One readable line per pydantic error: ``path: what is wrong (got X)``."""
    from estimator.config import FAMILY_CONFIGS

    lines: list[str] = []
    for err in exc.errors(include_url=False):
        raw = [str(part) for part in err["loc"]]
        family = raw[1] if len(raw) > 1 and raw[0] == "model" and raw[1] in FAMILY_CONFIGS else None
        loc = [raw[0], *raw[2:]] if family else raw
        kind = err["type"]
        if kind == "bool_for_number":  # raised for the whole section; the field is in its context
            loc = [*loc, str(err.get("ctx", {}).get("field", ""))]
        path = ".".join(loc) or "config"
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1], family)
            known = list(parent.model_fields) if parent else []
            hint = did_you_mean(loc[-1], known)
            lines.append(f"{path}: unknown key{hint}" + (f" (known: {', '.join(known)})" if known else ""))
        elif kind == "union_tag_invalid" or (kind == "literal_error" and loc == ["model", "family"]):
            tag = str(err.get("ctx", {}).get("tag", err.get("input", "")))
            path = "model"
            known = list(FAMILY_CONFIGS)
            lines.append(f"{path}.family: unknown model family {tag!r}{did_you_mean(tag, known)}"
                         f" (known: {', '.join(known)})")
        elif kind == "value_error" and not loc:  # a check across sections: its message names the field
            lines.append(err["msg"].removeprefix("Value error, "))
        elif kind == "value_error":
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or kind == "missing" else f", got {got!r}"
            lines.append(f"{path}: {err['msg'][0].lower()}{err['msg'][1:]}{shown}")
    return lines


def _model_at(loc: list[str], family: str | None) -> type[BaseModel] | None:
    """The pydantic model class at a dotted location of the config, for 'did you mean' hints."""
    from estimator.config import FAMILY_CONFIGS

    model: type[BaseModel] | None = Config
    for depth, part in enumerate(loc):
        if model is None or part not in model.model_fields:
            return None
        if depth == 0 and part == "model":
            model = FAMILY_CONFIGS.get(family or "mlp")
            continue
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


