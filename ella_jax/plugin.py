"""User code named on the command line as MODULE:FUNCTION (a caption upsampler, a VQA model)."""

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path


class PluginError(ValueError):
    """A MODULE:FUNCTION that cannot be loaded; the message names the option and why."""


def load_function(spec: str, option: str) -> Callable:
    """The callable named by "MODULE:FUNCTION", MODULE a dotted module name or a .py path.
    `option` (e.g. "--vqa") prefixes every error message."""
    module_name, colon, function_name = spec.rpartition(":")
    if not colon or not module_name or not function_name:
        raise PluginError(f"{option} {spec!r}: expected MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise PluginError(f"{option}: {file}: no such file")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{option}: cannot import {module_name} ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise PluginError(f"{option}: {module_name} has no function {function_name}")
    return function
