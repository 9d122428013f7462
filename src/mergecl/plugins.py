"""Extensions from outside mergecl: modules that register rules, methods, backbones or sources.

A plugin is any Python module whose import registers something (``mergecl.merging.register_rule``,
...). mergecl imports, in this order and once each:

- the entry points of the group ``mergecl.plugins`` of installed packages
  (``[project.entry-points."mergecl.plugins"] myrules = "my_package.rules"``);
- the modules named in ``$MERGECL_PLUGINS`` (separated by ``,``);
- the modules given with ``mergecl --plugin X`` (repeatable).

A name is a module to import (``my_package.rules``) or the path of a ``.py`` file. Importing a
plugin runs its code: name only modules you trust, as with any Python import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from mergecl.errors import MergeclError

ENTRY_POINT_GROUP = "mergecl.plugins"
_loaded: set[str] = set()


def plugin_names(extra: Iterable[str] = ()) -> list[str]:
    """The plugins to load: entry points, then ``$MERGECL_PLUGINS``, then ``extra``."""
    names = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [n.strip() for n in os.environ.get("MERGECL_PLUGINS", "").split(",") if n.strip()]
    return list(dict.fromkeys([*names, *extra]))


def load_plugins(extra: Iterable[str] = ()) -> list[str]:
    """Import every plugin (see the module docstring) not imported yet; return their names."""
    loaded = []
    for name in plugin_names(extra):
        if name in _loaded:
            continue
        _import(name)
        _loaded.add(name)
        loaded.append(name)
    return loaded


def _import(name: str) -> None:
    path = Path(name)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise MergeclError(f"plugin {name}: no such file")
            module_name = f"mergecl_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name.split(":")[0])
    except MergeclError:
        raise
    except ImportError as err:
        raise MergeclError(f"plugin {name}: cannot be imported ({err})") from None
    except Exception as err:  # the plugin's own code failed: say which plugin, and how
        raise MergeclError(f"plugin {name}: {type(err).__name__}: {err}") from None
