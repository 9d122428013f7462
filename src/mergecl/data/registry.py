"""Sources by name. Each source declares itself once, in its own module, with ``register_source``;
``get_source(name, root=None, seed=0, **options)`` (what a run config calls) reads only that
declaration: no source name is written here.

A declaration (``Source``) says:

- ``loader``: a function returning a ``Dataset``; its parameters are the source's options, plus
  ``root`` (the folder it reads) and ``seed`` (the run's seed) when it takes them;
- ``options``: the schema of those options (an ``Options`` model: type, default, range), checked
  when a run config is read (``data.options``) and by ``get_source``;
- ``files``: where its files come from:
  ``"data_root"``: a folder, ``<data root>/<name>`` unless a root is given;
  ``"folder"``: a folder the user names (no default: without a root it is an error);
  ``"packaged"``: inside mergecl or one of its dependencies (a root is ignored);
  ``"hub"``: fetched by the loader from a hub (a root, when given, is the hub's cache: the option ``cache_dir``);
- ``remotes``: its download recipe (the official files, for ``prepare``), if any.

Default data root: ``$MERGECL_DATA`` if set, else ``~/.cache/mergecl/data`` (where ``prepare``
downloads to by default). An explicit ``root`` is the source's folder itself.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergecl.data.types import Dataset
from mergecl.errors import MergeclError
from mergecl.options import Options, read_options

if TYPE_CHECKING:
    from mergecl.data.download import Remote

Files = Literal["data_root", "folder", "packaged", "hub"]
FILES: tuple[str, ...] = ("data_root", "folder", "packaged", "hub")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # also a folder name: <data root>/<name>


@dataclass(frozen=True)
class Source:
    """One data source, declared once (see the module docstring)."""

    name: str
    summary: str  # one line: what it is
    loader: Callable[..., Dataset]
    options: type[Options] = Options  # the schema of data.options; default: no options
    files: Files = "data_root"
    layout: str = ""  # what its folder holds, for messages ("root/<class>/<image>")
    remotes: tuple[Remote, ...] = ()  # the official files; () = no download recipe

    @property
    def takes_seed(self) -> bool:
        return "seed" in inspect.signature(self.loader).parameters

    @property
    def needs_root(self) -> bool:
        """The loader reads a folder (``root``): data_root and folder sources."""
        return self.files in ("data_root", "folder")


SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    loader: Callable[..., Dataset],
    *,
    summary: str,
    options: type[Options] = Options,
    files: Files = "data_root",
    layout: str = "",
    remotes: tuple[Remote, ...] | list[Remote] = (),
) -> Source:
    """Declare data source ``name`` (see the module docstring); call it in the source's own module.

    The declaration is checked against the loader here, so a mistake fails at import, not mid-run.
    """
    source = Source(name, summary, loader, options, files, layout, tuple(remotes))
    _check_declaration(source)
    if name in SOURCES and SOURCES[name].loader is not loader:
        raise MergeclError(f"data source {name!r} is already registered (by {_where(SOURCES[name].loader)})")
    SOURCES[name] = source
    return source


def _where(loader: Callable[..., Any]) -> str:
    return f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', repr(loader))}"


def _check_declaration(source: Source) -> None:
    bad = f"register_source({source.name!r})"
    if not isinstance(source.name, str) or not _NAME.fullmatch(source.name):
        raise MergeclError(f"{bad}: a source name is letters, digits, '_', '.' or '-'")
    if source.files not in FILES:
        raise MergeclError(f"{bad}: files must be one of {', '.join(FILES)}, got {source.files!r}")
    if not (isinstance(source.options, type) and issubclass(source.options, Options)):
        raise MergeclError(f"{bad}: options must be a subclass of mergecl.options.Options")
    if source.remotes and not source.needs_root:
        raise MergeclError(f"{bad}: a download recipe needs a folder to download to (files: data_root or folder)")
    if not callable(source.loader):
        raise MergeclError(f"{bad}: the loader must be callable")
    fields = source.options.model_fields
    if {"root", "seed"} & set(fields):
        raise MergeclError(f"{bad}: 'root' and 'seed' are not options: get_source passes them to the loader")
    params = inspect.signature(source.loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # **kwargs: takes whatever the schema declares
    wanted = [*fields, *(["root"] if source.needs_root else [])]
    if source.files == "hub" and "cache_dir" not in fields:
        raise MergeclError(f"{bad}: a hub source has the option 'cache_dir' (a given root is the hub's cache)")
    for key in wanted:
        if key not in params:
            raise MergeclError(f"{bad}: {_where(source.loader)} has no parameter {key!r}")
    for key, param in params.items():
        if param.default is inspect.Parameter.empty and key not in wanted and key != "seed":
            raise MergeclError(f"{bad}: parameter {key!r} of {_where(source.loader)} is not an option of the schema")


def source_names() -> tuple[str, ...]:
    """The registered sources, in the order they were declared."""
    return tuple(SOURCES)


def __getattr__(attr: str) -> Any:
    if attr == "SOURCE_NAMES":  # always current: plugins may register sources after import
        return source_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def find_source(name: str, where: str = "") -> Source:
    """The declaration of ``name``; a MergeclError listing the valid names (prefixed with ``where``)."""
    if not isinstance(name, str) or name not in SOURCES:
        prefix = f"{where}: " if where else ""
        raise MergeclError(f"{prefix}unknown data source {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


def read_source_options(name: str, given: Any, where: str) -> Options:
    """``given`` checked against the schema of source ``name``: an unknown option, a missing
    required one, a wrong type or an out-of-range value is a one-line MergeclError naming the key."""
    schema = find_source(name).options
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise MergeclError(f"{where}: expected a mapping of options, got {given!r}")
    fields = schema.model_fields
    for key in given:
        if key not in fields:
            known = f"options of {name}: {', '.join(fields)}" if fields else f"{name} takes no options"
            raise MergeclError(f"{where}: unknown option {key!r} ({known})")
    for key, info in fields.items():
        if info.is_required() and key not in given:
            raise MergeclError(f"{where}: data source {name!r} needs the option {key!r}")
    return read_options(schema, dict(given), where)


def data_root() -> Path:
    """Where data sets live by default (see the module docstring)."""
    if env := os.environ.get("MERGECL_DATA"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergecl" / "data"


def default_root(name: str) -> Path:
    return data_root() / name


def get_source(
    name: str, root: str | Path | None = None, seed: int = 0, download: bool = False, **options: Any
) -> Dataset:
    """Load source ``name``; ``options`` go to its loader (e.g. ``hub_id=`` for hf, ``domains=``),
    checked against its schema (the schema's defaults fill the others).

    ``download=True`` first fetches the official files into ``root`` (needs internet).
    """
    source = find_source(name)
    checked = read_source_options(name, options, name)
    kwargs = {key: getattr(checked, key) for key in type(checked).model_fields}
    if source.takes_seed:
        kwargs["seed"] = seed
    if source.files == "hub" and root is not None and "cache_dir" not in checked.model_fields_set:
        kwargs["cache_dir"] = str(Path(root).expanduser())  # the hub cache is its "root"
    if source.needs_root:
        if root is None and source.files == "folder":
            layout = f" ({source.layout})" if source.layout else ""
            raise MergeclError(f"data source {name!r} needs a root folder{layout}")
        root = Path(root).expanduser() if root is not None else default_root(name)
        if download:
            if not source.remotes:
                raise MergeclError(f"data source {name!r} has no download recipe; put the files in {root}")
            from mergecl.data.download import prepare  # fetching is rare: urllib and tarfile only then

            prepare(name, root)
        kwargs["root"] = root
    return source.loader(**kwargs)
