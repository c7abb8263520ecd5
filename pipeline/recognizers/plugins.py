"""Third-party recognizers, loaded by name on the worker, so a caller in another app sends only the name.

The protocol. A recognizer has a name, parameters with defaults, and a factory: called once per process with the
parameters as keyword arguments, it returns a callable that takes one tile (an 8-bit BGR or grey numpy array) and
returns `pipeline.model.Detections` in that tile's pixel coordinates. A plugin hands tilerec either

- a `RecognizerSpec` (name, factory, params, description, cost_ms): used as given, or
- the factory itself (a class or a function): its keyword parameters are the recognizer's parameters, each needs a
  default (the default's type is what callers' values are checked against, as for the built-ins); the first line of
  its docstring is the description and an optional `cost_ms` attribute the time of one 640x640 tile on one core;
  optional `second_stage` and `stage_by_default` attributes declare a second stage (see `RecognizerSpec`).

Two ways to name one:

- Entry points, group `tilerec.recognizers`, declared by an installed package (see tests/plugin_example):
  ``[project.entry-points."tilerec.recognizers"]  bright-spots = "tilerec_bright_spots:BrightSpots"``.
  The entry point's name is the recognizer's name. Installed by the operator, so always allowed. A built-in of the
  same name wins.
- ``package.module:factory`` as the recognizer name. The module is imported by whoever handles the message, so
  anyone who can publish to the broker could run any importable code: such names are refused unless the module is
  listed, exactly, in `allow_modules`: a worker (and the CLI, which checks options) lists those of its
  TILEREC_PLUGIN_MODULES, a comma-separated list; a program of its own lists its own.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from pipeline.recognizers import RecognizerError, RecognizerSpec

GROUP = "tilerec.recognizers"
MODULES_ENV = "TILEREC_PLUGIN_MODULES"
_allowed: frozenset[str] = frozenset()  # the modules `module:factory` names may import, in this process


def spec_from(name: str, target: object) -> RecognizerSpec:
    """A plugin's spec from what it exports: a `RecognizerSpec`, or a factory whose keyword defaults are its params."""
    if isinstance(target, RecognizerSpec):
        return dataclasses.replace(target, name=name)
    if not callable(target):
        raise RecognizerError(f"recognizer {name!r}: {target!r} is neither a RecognizerSpec nor a factory")
    params = {}
    for parameter in inspect.signature(target).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            raise RecognizerError(f"recognizer {name!r}: parameter {parameter.name!r} of the factory has no default")
        params[parameter.name] = parameter.default
    description = (inspect.getdoc(target) or "").partition("\n")[0]
    cost_ms = float(getattr(target, "cost_ms", RecognizerSpec.cost_ms))
    stage, by_default = getattr(target, "second_stage", None), getattr(target, "stage_by_default", True)
    return RecognizerSpec(name, target, params, description, cost_ms, second_stage=stage, stage_by_default=by_default)


def _entry_points() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=GROUP)}


def entry_point_names() -> set[str]:
    return set(_entry_points())


def module_list(text: str) -> tuple[str, ...]:
    """The modules of a comma-separated list such as TILEREC_PLUGIN_MODULES, spaces around names left out."""
    return tuple(module.strip() for module in text.split(",") if module.strip())


def allow_modules(modules: Iterable[str]) -> None:
    """From now on, `module:factory` recognizer names may import exactly these modules (none until called).

    Args:
        modules: module names, such as `module_list` gives them."""
    global _allowed
    _allowed = frozenset(modules)


def allowed_modules() -> set[str]:
    """The modules `module:factory` names may import in this process (`allow_modules`)."""
    return set(_allowed)


def _from_reference(name: str) -> RecognizerSpec:
    """`package.module:factory`, imported only if the operator listed the module in TILEREC_PLUGIN_MODULES."""
    module_name, _, attribute = name.partition(":")
    if module_name not in allowed_modules():
        raise RecognizerError(
            f"recognizer {name!r}: module {module_name!r} is not allowed; a worker imports only the modules listed "
            f"in {MODULES_ENV} (or plugins installed under the entry-point group {GROUP!r})"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise RecognizerError(f"recognizer {name!r}: cannot import {module_name!r}: {error!r}") from None
    if not attribute.isidentifier() or not hasattr(module, attribute):
        raise RecognizerError(f"recognizer {name!r}: module {module_name!r} has no factory {attribute!r}")
    return spec_from(name, getattr(module, attribute))


def find(name: str) -> RecognizerSpec | None:
    """The spec of an installed plugin or an allowed `module:factory` name; None if `name` is neither."""
    if ":" in name:
        return _from_reference(name)
    point = _entry_points().get(name)
    if point is None:
        return None
    try:
        target = point.load()
    except Exception as error:  # a broken third-party package: say which, not where deep inside it
        raise RecognizerError(f"recognizer {name!r}: plugin {point.value!r} failed to load: {error!r}") from None
    return spec_from(name, target)
