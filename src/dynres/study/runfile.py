"""The run file of ``dynres run CONFIG`` (docs/run-config.md): TOML or YAML read into a validated StudyConfig.

Each section maps to one settings dataclass (``[backbone]`` TrainConfig, ``[scale]`` ScaleConfig, ``[eval]``
EvalConfig, ``[dynamic]`` DynamicConfig, ``[calibration]`` CalibrationConfig) on top of the demo's preset. An
unknown or ill-typed setting is refused with the file and the setting named: types are checked against the
fields' annotations, so settings whose default is None are checked too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from dynres.errors import ConfigError
from dynres.model.train import OPTIMIZER_TIED
from dynres.study.chain import ChainConfig, demo_config
from dynres.study.demo import StudyConfig

SECTIONS = ("backbone", "scale", "eval", "dynamic", "calibration")
# the top-level settings: their type, and the least value an int may take
SCALARS: dict[str, tuple[type, int | None]] = {"data": (str, None), "out": (str, None), "seed": (int, 0),
                                               "workers": (int, 0), "quick": (bool, None), "io_images": (int, 1),
                                               "io_repeats": (int, 1)}
TOP_LEVEL = {*SCALARS, *SECTIONS}
# settings inside sections that name files: relative to the run file, as data and out are
PATHS = {"backbone": ("init",), "scale": ("init", "labels")}


def accepts(tp: Any, value: Any) -> bool:
    """Does a TOML/YAML value (lists already tuples) fit the annotation ``tp``? ``float`` takes ints, ``int`` and
    ``float`` never take booleans, ``tuple[X, ...]`` checks its items."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if isinstance(value, bool) and tp in (int, float):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(accepts(args[0], v) for v in value)
        return not args or (len(args) == len(value) and all(accepts(a, v) for a, v in zip(args, value)))
    if origin is not None:  # dict[...] and the like: the container's type only
        return isinstance(value, origin)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _float_field(tp: Any) -> bool:
    """``float`` or ``float | None``: a setting an int is given for as a float."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return set(typing.get_args(tp)) == {float, type(None)}
    return tp is float


def override(obj: Any, section: str, values: Any, source: str | Path) -> Any:
    """``dataclasses.replace(obj, **values)`` that names the file and key of an unknown or ill-typed setting, and
    the file and section of a value the dataclass itself refuses."""
    if not isinstance(values, dict):
        raise ConfigError(source, f"[{section}] must be a table of settings, got {type(values).__name__}")
    values = dict(values)
    known = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in known:
            raise ConfigError(source, f"unknown setting {section}.{key}; known: {', '.join(sorted(known))}")
        if isinstance(value, list):  # configs hold tuples (frozen, hashable)
            value = values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if not accepts(hints[key], value):
            expected = str(hints[key]).replace("typing.", "") if typing.get_origin(hints[key]) else hints[key].__name__
            raise ConfigError(source, f"{section}.{key} must be {expected}, got {value!r}")
        if type(value) is int and _float_field(hints[key]):
            values[key] = float(value)  # lr = 1 is lr = 1.0: one value, one stage key
    try:
        return dataclasses.replace(obj, **values)
    except ConfigError as err:  # the dataclasses know the setting, not the file it came from
        raise ConfigError(source, f"[{section}] {err}") from None


def _parse(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.load(text, Loader=_unique_keys_loader()) or {}
    except OSError as err:
        raise ConfigError(path, f"cannot read config: {err.strerror}") from err
    except Exception as err:  # tomllib / yaml parse errors carry line numbers in their message
        raise ConfigError(path, f"not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(path, "the config must be a mapping of settings")
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise ConfigError(path, f"unknown setting(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(TOP_LEVEL))}")
    if "data" not in raw or "out" not in raw:
        raise ConfigError(path, "needs `data` (an ImageFolder root with train/ and val/) and `out` (run directory)")
    for key, (tp, least) in SCALARS.items():  # checked, not converted: quick = "false" is not true
        if key in raw and not (accepts(tp, raw[key]) and (least is None or raw[key] >= least)):
            want = tp.__name__ + ("" if least is None else f" >= {least}")
            raise ConfigError(path, f"{key} must be {want}, got {raw[key]!r}")
    return _cost_table(_relative_paths(raw, path), path)


def _relative_paths(raw: dict, path: Path) -> dict:
    """``raw`` with the file paths inside sections (:data:`PATHS`) resolved against the run file's folder."""
    raw = dict(raw)
    for section, keys in PATHS.items():
        values = raw.get(section)
        if isinstance(values, dict):
            raw[section] = {k: str((path.parent / Path(v).expanduser()).resolve())
                            if k in keys and isinstance(v, str) else v for k, v in values.items()}
    return raw


def _cost_table(raw: dict, path: Path) -> dict:
    """``raw`` with ``[dynamic] cost_table``'s resolutions as ints (TOML's keys are strings, YAML's may be ints)."""
    table = raw.get("dynamic", {}).get("cost_table") if isinstance(raw.get("dynamic"), dict) else None
    if not isinstance(table, dict):
        return raw
    try:
        table = {int(r): float(ms) for r, ms in table.items()}
    except (TypeError, ValueError):
        raise ConfigError(path, f"dynamic.cost_table must map resolutions to milliseconds, got {table!r}") from None
    return raw | {"dynamic": raw["dynamic"] | {"cost_table": table}}


def _unique_keys_loader():
    """YAML's safe loader, refusing a key given twice in one mapping (TOML refuses it; YAML keeps the last)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"{', '.join(twice)} given twice", node.start_mark)
        return loader.construct_mapping(node, deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeys


# settings the scale labels make moot: with ``[scale] labels`` no shard backbone trains, and the labels bring
# their own crops; set together they would be silently ignored, so they are refused
LABELS_IGNORE = ("folds", "cheap", "splits", "shard_epochs", "crops")


def file_settings(raw: dict) -> tuple[str, ...]:
    """The settings the file sets, by dotted name (``seed``, ``scale.folds``): recorded as the file's."""
    top = [k for k in raw if k not in SECTIONS]
    return tuple(top + [f"{sec}.{key}" for sec in SECTIONS if isinstance(raw.get(sec), dict) for key in raw[sec]])


def retie_optimizer(obj: Any, section: str, values: dict, path: Path) -> dict:
    """A file that switches ``[section]``'s optimizer away from the preset's gets, for each optimizer-tied setting
    it leaves out (:data:`OPTIMIZER_TIED`), the default dynres keeps for that optimizer (the backbone's
    ``TrainConfig`` resolves None per optimizer), never the preset's value chosen for another one: AdamW's weight
    decay under SGD trains a backbone to chance. Where dynres has no such default (the scale model's recipe was
    measured with AdamW only) the file must set them, or it is refused by name."""
    if not isinstance(values, dict) or values.get("optimizer", obj.optimizer) == obj.optimizer:
        return values
    missing = [k for k in OPTIMIZER_TIED if k not in values]
    if section == "backbone":
        return {**values, **dict.fromkeys(missing)}
    if missing:
        raise ConfigError(path, f"[{section}] optimizer = {values['optimizer']!r} needs "
                                f"{' and '.join(f'{section}.{k}' for k in missing)} set too: the defaults "
                                f"({', '.join(f'{k} = {getattr(obj, k):g}' for k in missing)}) are for "
                                f"{obj.optimizer}")
    return values


def _refuse_ignored(raw: dict, path: Path) -> None:
    scale = raw.get("scale") if isinstance(raw.get("scale"), dict) else {}
    if scale.get("labels") is not None:
        moot = [f"scale.{k}" for k in LABELS_IGNORE if k in scale]
        if moot:
            raise ConfigError(path, f"{', '.join(moot)} would be ignored: scale.labels reuses existing labels (no "
                                    "shard backbone trains, the labels' own crops are used); drop one of them")


def _chain(raw: dict, path: Path) -> ChainConfig:
    """The preset for a user's data (:func:`demo_config`; the scale labels' cross-validation as ScaleConfig's own
    defaults, so ``folds = K`` trains K shard backbones unless the file sets ``cheap = true``) with the file's
    sections on top; the shard backbones keep the backbone's recipe."""
    _refuse_ignored(raw, path)
    chain = demo_config(quick=raw.get("quick", False), seed=raw.get("seed", 0))
    backbone = override(chain.backbone, "backbone",
                        retie_optimizer(chain.backbone, "backbone", raw.get("backbone", {}), path), path)
    scale = override(dataclasses.replace(chain.scale, backbone=backbone), "scale",
                     retie_optimizer(chain.scale, "scale", raw.get("scale", {}), path), path)
    evaluation = override(chain.eval, "eval", raw.get("eval", {}), path)
    dynamic = override(chain.dynamic, "dynamic", raw.get("dynamic", {}), path)
    try:  # ChainConfig refuses a [scale] grid that differs from the [eval] grid
        return dataclasses.replace(chain, backbone=backbone, scale=scale, eval=evaluation, dynamic=dynamic)
    except ConfigError as err:
        raise ConfigError(path, err.reason) from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a TOML or YAML run file (see docs/run-config.md) into a validated :class:`StudyConfig`."""
    from dynres.study.calibrate import CalibrationConfig

    path = Path(path)
    raw = _parse(path)
    data = (path.parent / raw["data"]).resolve()
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise ConfigError(path, f"data: {data / split} is not a directory (expected DATA/train and DATA/val)")
    chain = _chain(raw, path)
    calibration = override(CalibrationConfig(), "calibration", raw.get("calibration", {}), path)
    return StudyConfig(out=(path.parent / raw["out"]).resolve(), data=data, seed=raw.get("seed", 0),
                       workers=raw.get("workers", 0), quick=raw.get("quick", False),
                       io_images=raw.get("io_images", 64), io_repeats=raw.get("io_repeats", 3), chain=chain,
                       calibration=calibration, file_settings=file_settings(raw))
