"""Finding the handle class a config names, and shipping it to worker processes.

``Handle:`` may be a class name defined in a ``handles/`` folder (or ``src/``, where the original easy-serve
kept its ``handle.py``, so its configs run unchanged from its repository's root), ``module:Class``,
``path/to/file.py:Class``, or (from Python) a class object, including one defined in a notebook cell.
The parent resolves names to a :class:`HandleRef` without importing the handle's module (which may
import CUDA libraries); the worker imports it.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import importlib
import importlib.machinery
import importlib.util
import inspect
import io
import itertools
import linecache
import logging
import os
import re
import sys
import sysconfig
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import ConfigError
from .handle import Handle, HandleArgs, LegacyHandle

__all__ = ["HandleRef", "resolve", "build"]

log = logging.getLogger("easyserve")


@dataclasses.dataclass(frozen=True)
class HandleRef:
    """How a worker finds the handle: a module, a file, or a pickled class."""

    kind: str  # "module" | "file" | "pickle"
    target: str | bytes  # module name, file path, or cloudpickle bytes
    name: str  # class name
    # a pickled class's: where its code was written, and the lines of those files (see _code_sources)
    sources: tuple[dict, dict] | None = dataclasses.field(default=None, compare=False, repr=False)
    # a source file's text as it was when the server took it (see _read_source); a module's, and its file
    # (origin), where it is the user's own (see _own_source)
    source: bytes | None = dataclasses.field(default=None, compare=False, repr=False)
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return self.name if self.kind == "pickle" else f"{self.target}:{self.name}"


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle's, but for a Jupyter kernel's ``open``: IPython puts a wrapper of it in the notebook's
    namespace (refusing the kernel's own standard streams), which a handle's functions find there, and
    which cloudpickle shipped by value, as code of no module. The workers get Python's own: a setup's
    traceback for a file not there ended in a frame of "<dynamic-code>", IPython's code, not the user's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # IPython's own, by identity: a user's wrapper of open (functools.wraps, joining a data folder) is theirs
        shell = sys.modules.get("IPython.core.interactiveshell")
        self._ipython_open = getattr(shell, "_modified_open", None)

    def reducer_override(self, obj: Any) -> Any:
        if self._ipython_open is not None and obj is self._ipython_open:
            return getattr, (builtins, "open")
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """``obj`` pickled as a handle class goes to its workers (see :class:`_Pickler`)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue()


def resolve(spec: Any, base_dir: Path) -> HandleRef:
    """Turn a config's ``Handle`` value into a :class:`HandleRef`, or raise ``ConfigError``."""
    if isinstance(spec, type):
        check_class(spec)
        imported = _imported_from_own_module(spec, base_dir)
        if imported is not None:
            return imported
        # cloudpickle ships classes from __main__ (scripts, notebooks) by value, importable ones by name
        try:
            pickled = dumps(spec)
        except Exception as exc:
            culprit = _unpicklable(spec)
            raise ConfigError(
                f"Handle: {spec.__name__} cannot be sent to the worker processes: {type(exc).__name__}: {exc}"
                f"{f' ({culprit})' if culprit else ''}. A class defined in a notebook or script goes to each "
                f"worker by value, with the globals it uses; an object such as a model session, a lock or an "
                f"open file cannot go with it. Create it in setup(), which runs in the worker, and keep it on "
                f"self (or pass its path in HandleArgs)"
            ) from None
        if len(pickled) > HEAVY_BYTES:
            log.warning("Handle: %s goes to each worker as %.0f MB%s: what a class defined in a notebook or "
                        "script uses goes with it, copied into every worker process, and held here while the "
                        "server runs. Load a model or large array in setup() instead (its path in HandleArgs)",
                        spec.__qualname__, len(pickled) / 2**20, _heaviest(spec))
        return HandleRef("pickle", pickled, spec.__qualname__, _code_sources(spec))
    module, sep, name = spec.rpartition(":")
    if sep:
        if not name.isidentifier():
            raise ConfigError(f"Handle: {spec!r} must end in a class name after ':'")
        if module.endswith(".py") or "/" in module or "\\" in module:
            path = Path(module).expanduser()
            if not path.is_absolute():  # where a class name is looked for: configs/x.yaml naming handles/x.py
                roots = list(dict.fromkeys((base_dir, base_dir.parent, Path.cwd())))
                path = next((root / path for root in roots if (root / path).is_file()), base_dir / path)
                if not path.is_file():
                    raise ConfigError(f"Handle: file {module!r} not found (looked in {', '.join(map(str, roots))})")
            if not path.is_file():
                raise ConfigError(f"Handle: file {module!r} not found")
            if not any(path.name.endswith(suffix) for suffix in importlib.machinery.all_suffixes()):
                # importlib makes no module of it: each worker's failure, and a restart's
                raise ConfigError(f"Handle: {module!r} is not a Python module's file (.py, or compiled: "
                                  f".pyc, {importlib.machinery.EXTENSION_SUFFIXES[0]})")
            return HandleRef("file", str(path.resolve()), name, source=_read_source(path))
        # ":Cls", ".mod:Cls": a worker's traceback; what import takes ("my-handles", "01_intro") is left to it
        if "" in module.split("."):
            raise ConfigError(f'Handle: {spec!r}: {module!r} is not a module name; use "module:Class" (no empty '
                              'name, no leading dot) or "path/to/file.py:Class"')
        return _module_ref(module, name, base_dir)
    if not spec.isidentifier():
        raise ConfigError(f'Handle: {spec!r} is not a class name; use "ClassName", "module:Class" or "file.py:Class"')
    folders = _handle_folders(base_dir)
    pattern = re.compile(rf"^class\s+{re.escape(spec)}\b", re.MULTILINE)
    found = [path for folder in folders for path in sorted(folder.glob("*.py")) if _defines(path, pattern)]
    if len(found) > 1:  # the first in the alphabet was served, an old copy as likely as not
        files = " and ".join(str(path) for path in found)
        raise ConfigError(f"Handle: a class {spec!r} is in {files}; name the one to serve: "
                          f'"{found[-1]}:{spec}"')
    if found:
        return HandleRef("file", str(found[0].resolve()), spec, source=_read_source(found[0]))
    from . import builtin

    if spec in builtin.__all__:  # the handles easyserve ships (OnnxModel, Demo, Echo), after a project's own
        return HandleRef("module", builtin.__name__, spec)
    searched = ", ".join(str(f) for f in folders) or "no handles/ or src/ folder found"
    # a misspelt name (TinyHandel) was told to be written as "module:Class" instead, not what it was
    defined = {name: path for folder in folders for path in sorted(folder.glob("*.py")) for name in _classes_in(path)}
    close = difflib.get_close_matches(spec, [*defined, *builtin.__all__], n=1)
    hint = ""
    if close:
        hint = f"did you mean {close[0]!r}" + (f" (in {defined[close[0]]})" if close[0] in defined else "") + "? Or "
    raise ConfigError(
        f"Handle: no class {spec!r} in a handles/ or src/ folder (searched: {searched}); "
        f'{hint}name it as "module:Class" or "path/to/file.py:Class" instead'
    )


def _read_source(path: Path) -> bytes | None:
    """The text of a handle's source file, which the workers run (not a compiled one's: that is imported).

    Read once, when the server starts or reloads: a worker started later (a crashed one's replacement,
    a recycled one, one put back on the old handle after a reload failed or was rolled back) read the
    file as it was then, so an edit saved for the next reload ran in it. A reload whose new handle
    crashed every batch was rolled back to the same crashing code; a failed reload's put-back served
    the new code beside the old; after a reload refused a syntax error, the next crash of a worker
    left its slot failing for ever. And ``__pycache__`` took two edits of one size within a second for
    one, serving the first after "reload done"."""
    if path.suffix not in importlib.machinery.SOURCE_SUFFIXES:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Handle: cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _module_ref(module: str, name: str, base_dir: Path) -> HandleRef:
    """A ``module:Class`` handle; with the module's text where it is the user's own (see :func:`_own_source`)."""
    return _own_module_ref(module, name, base_dir) or HandleRef("module", module, name)


def _imported_from_own_module(cls: type, base_dir: Path) -> HandleRef | None:
    """A class given as an object, which cloudpickle would send by name (imported from a module, not
    defined in ``__main__``), as a ``module:Class`` handle with its module's text, where the module is
    the user's own: sent by name, each worker imported the file as it was when the worker started."""
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__" or getattr(module, cls.__qualname__, None) is not cls:
        return None  # a notebook's or script's, a nested class, one its module no longer holds: by value
    return _own_module_ref(cls.__module__, cls.__qualname__, base_dir)


def _own_module_ref(module: str, name: str, base_dir: Path) -> HandleRef | None:
    """``module:Class`` with the module's text, where the module is the user's own; else None."""
    own = _own_source(module, base_dir)
    return HandleRef("module", module, name, source=own[1], origin=own[0]) if own else None


def _own_source(module: str, base_dir: Path) -> tuple[str, bytes] | None:
    """The file and text of module ``module`` where it is the user's own Python source: not easyserve's,
    nor installed (in site-packages or the standard library). Read once, at a start or a reload, as a
    handle file's is (see :func:`_read_source`): a worker started later ran the module as it was on disk
    then, and a reload rolled back onto a module since edited to crash served the crashing code again,
    for good. Found as a worker finds it, without importing it or the packages above it."""
    if module == "easyserve" or module.startswith("easyserve."):
        return None
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None) if loaded is not None else _find_spec(module, base_dir)
    origin = getattr(spec, "origin", None)
    if not isinstance(origin, str) or Path(origin).suffix not in importlib.machinery.SOURCE_SUFFIXES:
        return None
    path = Path(origin).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts) or any(path.is_relative_to(root) for root in _LIBRARIES):
        return None
    try:
        return str(path), path.read_bytes()
    except OSError:  # the worker says what is wrong with it
        return None


# Where the standard library is: a module there is Python's, not a handle of the user's.
_LIBRARIES = tuple(Path(sysconfig.get_path(name)).resolve() for name in ("stdlib", "platstdlib")
                   if sysconfig.get_path(name))


def _find_spec(module: str, base_dir: Path) -> Any:
    """Module ``module``'s spec, looked for where a worker imports it from (this process's path, then the
    config's folder and the working folder: see ``worker.main``) without running any of its packages."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is run to find it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        spec = importlib.machinery.PathFinder.find_spec(parts[0], [str(base_dir), os.getcwd()])
    for count in range(2, len(parts) + 1):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:count]), list(spec.submodule_search_locations))
    return spec


def _classes_in(path: Path) -> list[str]:
    """The classes a file in a handles/ folder defines at its top level, as :func:`_defines` reads it."""
    if path.name.startswith(".") or not path.is_file():
        return []
    try:
        return re.findall(r"^class\s+([^\W\d]\w*)", _text(path), re.MULTILINE)
    except OSError:
        return []


def _text(path: Path) -> str:
    """A Python file's text as Python reads it (read as plain UTF-8, a class on the first line of a file
    saved with a BOM, or named in Latin-1, was not found)."""
    return _decoded(path.read_bytes())


def _decoded(source: bytes) -> str:
    """Python source as text: a UTF-8 BOM left out, a ``coding:`` line heeded, newlines made ``\\n``. Bytes
    not of its encoding (a Latin-1 byte in a comment, which Python compiles all the same) are replaced."""
    try:
        return importlib.util.decode_source(source)
    except (UnicodeDecodeError, SyntaxError, LookupError):
        return source.decode("utf-8", "replace").replace("\r\n", "\n")


def _defines(path: Path, pattern: re.Pattern) -> bool:
    """Whether the file at ``path`` defines the class ``pattern`` finds. An editor's lock file
    (``.#handle.py``, a link to nowhere), a folder named ``*.py`` or a file that cannot be read is
    passed over: it stopped ``easyserve run`` with a traceback."""
    if path.name.startswith(".") or not path.is_file():
        return False
    try:
        return pattern.search(_text(path)) is not None
    except OSError as exc:
        log.warning("%s: cannot read it (%s); passed over in the search for a handle", path, exc.strerror or exc)
        return False


def build(ref: HandleRef, args: dict) -> Handle:
    """Import the handle class (in the worker) and instantiate it with ``HandleArgs``."""
    if ref.kind == "pickle":
        cls = cloudpickle.loads(ref.target)
        if ref.sources is not None:
            _restore_sources(cls, *ref.sources)
    else:
        pin(ref)  # (a worker pinned it already, before reading the HandleArgs; in a process of one's own, not)
        module = (_import_file(Path(ref.target), ref.source) if ref.kind == "file"
                  else _import_module(ref.target, ref.name))
        cls = getattr(module, ref.name, _MISSING)
        if cls is _MISSING:
            found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Handle)
                           and v is not Handle and not n.startswith("_"))
            close = difflib.get_close_matches(ref.name, found, n=1)
            raise ConfigError(f"Handle: {ref.target} has no {ref.name!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + (f"; its handles: {', '.join(found)}" if found else ""))
    check_class(cls)
    if issubclass(cls, Handle):
        _check_args(cls, args)
        handle = cls(**args)
        _taken_by_init(handle, cls)
        return handle
    return LegacyHandle(cls, **args)


def _taken_by_init(handle: Handle, cls: type) -> None:
    """The HandleArgs a handle's own ``__init__`` was given are none unread: it took them (as its parameters,
    or in ``**kw``, from which it may read what it wants before passing them on to ``Handle.__init__``,
    which keeps them in ``self.args`` where nothing reads them again: the built-in OnnxModel and the
    examples), and they were said to do nothing. A key it does not take is refused at start
    (``_check_args``). Only a handle with no ``__init__`` of its own, whose keys reach it in ``self.args``
    alone, is told of those unread; a misspelling is said for both (:meth:`HandleArgs.misspelt`)."""
    args = getattr(handle, "args", None)
    if isinstance(args, HandleArgs) and cls.__init__ is not Handle.__init__:
        args.taken_by_init()


# How much of the files a class sent by value was written in goes with it (a notebook's cells: small).
MAX_SOURCE_BYTES = 4 << 20


def _code_sources(cls: type) -> tuple[dict, dict]:
    """Where the code of ``cls``, sent by value, was written: each code object's file by its name and first
    line, and those files' lines as ``linecache`` holds them (IPython keeps each cell's there, in a file
    that is never written). cloudpickle names the file of all such code ``<dynamic-code>``: a worker's
    traceback of a handle defined in a notebook said neither which cell nor which line of it."""
    files = {_named(code): code.co_filename for function in _functions(cls) for code in _codes_of(function.__code__)}
    lines, size = {}, 0
    for filename in set(files.values()):
        text = linecache.getlines(filename)
        size += sum(map(len, text))
        if text and size <= MAX_SOURCE_BYTES:
            lines[filename] = text
    return files, lines


def _restore_sources(cls: type, files: dict, lines: dict) -> None:
    """Give the code of ``cls``, loaded from its pickle, the files :func:`_code_sources` found, and put their
    lines where tracebacks read them."""
    for filename, text in lines.items():
        linecache.cache.setdefault(filename, (sum(map(len, text)), None, text, filename))  # no mtime: kept

    def restored(code: types.CodeType) -> types.CodeType:
        consts = tuple(restored(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        return code.replace(co_filename=files.get(_named(code), code.co_filename), co_consts=consts)

    for function in _functions(cls):
        with contextlib.suppress(AttributeError, TypeError, ValueError):  # a builtin's, a C function's
            function.__code__ = restored(function.__code__)


def _functions(cls: type) -> list[types.FunctionType]:
    """The Python functions of ``cls`` and of its bases defined beside it (methods, static and class methods,
    properties'), and the functions of that module they call, as cloudpickle sends them along."""
    found: list[types.FunctionType] = []
    seen: set[int] = set()
    todo: list[Any] = [cls]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (staticmethod, classmethod)):
            todo.append(item.__func__)
        elif isinstance(item, property):
            todo.extend(f for f in (item.fget, item.fset, item.fdel) if f is not None)
        elif isinstance(item, type) and item.__module__ == cls.__module__:
            todo.extend([*vars(item).values(), *item.__bases__])
        elif isinstance(item, types.FunctionType):
            found.append(item)
            names = {name for code in _codes_of(item.__code__) for name in code.co_names}
            used = [item.__globals__[name] for name in names if name in item.__globals__]
            # and what a decorator wraps (functools.wraps keeps it, a closure holds it): a decorated forward's
            used += [cell.cell_contents for cell in item.__closure__ or () if _filled(cell)]
            used.append(getattr(item, "__wrapped__", None))
            todo.extend(value for value in used if getattr(value, "__module__", None) == cls.__module__)
    return found


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure's variable not yet given a value
        return False
    return True


def _named(code: types.CodeType) -> tuple[str, int, bytes]:
    """What tells a code object from the others of a class sent by value: its name (qualified, from Python
    3.11), its first line and its bytecode (on 3.10, a subclass's forward and its base's, in two cells,
    each at line 3, were one, and a traceback showed the one's file for the other)."""
    return getattr(code, "co_qualname", code.co_name), code.co_firstlineno, code.co_code


def _codes_of(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and the code objects within it (a nested function's, a comprehension's), outermost first."""
    return [code, *(inner for c in code.co_consts if isinstance(c, types.CodeType) for inner in _codes_of(c))]


def _closest(word: str, choices: list[str]) -> list[str]:
    """The choice ``word`` was likely meant to be, if one is near: two letters swapped (``modle``) come
    first, where difflib put ``mode`` before ``model``."""
    close = difflib.get_close_matches(word, choices, n=3)
    return sorted(close, key=lambda choice: sorted(choice.lower()) != sorted(word.lower()))[:1]


def shadowed(ref: HandleRef, folder: str | os.PathLike) -> str | None:
    """For a ``module:Class`` handle imported (in a worker), a warning where its module came from
    elsewhere than the file of that name in ``folder`` (the config's): a folder earlier on ``sys.path``
    (``PYTHONPATH``: another project's) held one of the same name, and its handle was served, without
    a word, in place of the one beside the config."""
    if ref.kind != "module":
        return None
    top = ref.target.split(".")[0]
    imported = getattr(sys.modules.get(top), "__file__", None)
    for beside in (Path(folder) / f"{top}.py", Path(folder) / top / "__init__.py"):
        if beside.is_file() and imported is not None and Path(imported).resolve() != beside.resolve():
            return (f"Handle: {ref.target}:{ref.name} was imported from {imported}, not from {beside} beside the "
                    f"config: a folder earlier on the module path (PYTHONPATH) holds a module {top!r} too; name the "
                    'file to serve the one beside the config ("path/to/file.py:Class")')
    return None


def _import_module(name: str, cls: str) -> Any:
    """The module a ``module:Class`` handle names. That it is not there at all is the config's mistake
    (one line, as for a class it lacks); a module that is there and fails to import is the handle's,
    with its traceback: one it imports in turn that is not installed, say. A module whose text the
    server read is imported from that text (see :func:`pin`); the packages above it as they are."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
            raise
        file = name.replace(".", "/") + ".py"
        raise ConfigError(f"Handle: no module {exc.name!r} to import {cls!r} from: not installed, nor beside the "
                          f'config or in the folder easyserve runs from; or name its file: "path/to/{file}:{cls}"'
                          ) from None


def _check_args(cls: type, args: dict) -> None:
    """HandleArgs that the handle's ``__init__`` does not take are the config's mistake, said in one
    line with what it takes: ``cls(**args)`` raised a TypeError with a traceback, and every worker
    failed to start, again under ``--supervise``. A TypeError raised inside ``__init__`` stays the
    handle's own."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a signature Python cannot tell (a class made in C): let it say
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    takes = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in args if key not in takes]
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in args
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if unknown:
        close = _closest(unknown[0], takes)
        raise ConfigError(f"HandleArgs: {cls.__qualname__} takes no {unknown[0]!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + (f"; it takes {', '.join(takes)}" if takes else "; it takes no HandleArgs"))
    if missing:
        raise ConfigError(f"HandleArgs: {cls.__qualname__} needs {', '.join(map(repr, missing))}, which "
                          "HandleArgs does not give")


_MISSING = object()


def check_set_up(handle: Any) -> None:
    """After ``setup``: a :class:`Handle` with no ``forward`` of its own, on its class or set on it
    (``self.forward = torch.compile(model)``), nor a ``run_batch``, started, and answered every
    request 500 saying so."""
    if (isinstance(handle, Handle) and type(handle).run_batch is Handle.run_batch
            and getattr(handle.forward, "__func__", None) is Handle.forward):
        own = [name for klass in type(handle).__mro__ if klass not in Handle.__mro__
               for name, value in vars(klass).items() if callable(value)]  # not getattr: it runs properties
        close = difflib.get_close_matches("forward", own, n=1, cutoff=0.7)  # ``foward``, ``Forward``
        raise ConfigError(f"Handle: {type(handle).__qualname__} defines no forward(self, batch) (nor run_batch): "
                          "it would answer no request" + (f" (did you mean forward, not {close[0]}?)" if close else ""))


def left_training(handle: Any) -> str | None:
    """A warning for a PyTorch model the handle keeps (an attribute of it, or in a list, tuple or dict
    there) left in training mode with a layer that then depends on its batch: BatchNorm normalises by
    the batch's own statistics, Dropout zeroes at random. Its answers change with the requests batched
    beside a request, silently (a request alone may fail: BatchNorm takes no batch of one). ``None``
    where there is none, or torch was never imported."""
    modules = getattr(getattr(sys.modules.get("torch"), "nn", None), "modules", None)
    norm = getattr(getattr(modules, "batchnorm", None), "_BatchNorm", None)
    dropout = getattr(getattr(modules, "dropout", None), "_DropoutNd", None)
    if not (isinstance(norm, type) and isinstance(dropout, type)):
        return None
    found = []
    for where, model in _kept(handle, sys.modules["torch"].nn.Module):
        try:
            layer = next(((n, m) for n, m in model.named_modules() if isinstance(m, (norm, dropout)) and m.training),
                         None)
        except Exception:  # a module of its own kind: a warning is not worth the start
            continue
        if layer is not None:
            found.append((where, *layer))
    if not found:
        return None
    where, name, layer = found[0]
    does = "normalises by each batch" if isinstance(layer, norm) else "zeroes values at random"
    more = f" (and {len(found) - 1} more model(s) so)" if len(found) > 1 else ""
    return (f"Handle: {where} is in training mode: its {type(layer).__name__}{f' {name!r}' if name else ''} {does}, "
            f"so a request's answer depends on the requests batched with it; call {where}.eval() in setup(){more}")


KEPT_LOOKED_AT = 100  # the items of a list, tuple or dict a handle keeps that are looked at for models


def _kept(handle: Any, kind: type) -> Iterator[tuple[str, Any]]:
    """What a handle keeps of ``kind``, with where: an attribute, or one of the first items of a list,
    tuple or dict there (a handle may keep millions: a vocabulary)."""
    for attribute, value in getattr(handle, "__dict__", {}).items():
        if isinstance(value, kind):
            yield f"self.{attribute}", value
        elif isinstance(value, dict):
            yield from ((f"self.{attribute}[{key!r}]", item)
                        for key, item in itertools.islice(value.items(), KEPT_LOOKED_AT) if isinstance(item, kind))
        elif isinstance(value, (list, tuple)):
            yield from ((f"self.{attribute}[{i}]", item)
                        for i, item in enumerate(value[:KEPT_LOOKED_AT]) if isinstance(item, kind))


def check_class(cls: Any) -> None:
    if not isinstance(cls, type):
        raise ConfigError(f"Handle: {cls!r} is not a class")
    if issubclass(cls, Handle):
        _check_hooks(cls)
        return
    if not any("__call__" in vars(klass) for klass in cls.__mro__ if klass is not object):
        raise ConfigError(
            f"Handle: {cls.__qualname__} is neither an easyserve.Handle subclass nor an original-style "
            "handle (__init__(self, gpu) and __call__(self, data))"
        )


# what a worker passes each of a Handle's methods, besides self
HOOKS = {"setup": ("device",), "preprocess": ("task",), "forward": ("batch",), "postprocess": ("output", "task"),
         "stack": ("inputs",), "unstack": ("outputs", "n"), "run_batch": ("tasks",)}


def _check_hooks(cls: type) -> None:
    """A :class:`ConfigError` for a method easyserve cannot call as it does: ``async def`` (its coroutine
    never ran: an ``async def preprocess`` gave forward coroutines, and every request a 500 that blamed
    forward; an ``async def setup`` set nothing up, and the server reported ready), or one that takes other
    arguments (``self`` left out, a ``@staticmethod`` over ``(self, task)``: preprocess's TypeError was
    each request's 400, as if every client had erred, and the log said nothing)."""
    own_run_batch = cls.run_batch is not Handle.run_batch
    for name, passed in HOOKS.items():
        if own_run_batch and name not in ("setup", "run_batch"):  # the others are its own, called as it likes
            continue
        found = inspect.getattr_static(cls, name, None)
        if isinstance(found, staticmethod):
            fn, given = found.__func__, passed
        elif isinstance(found, classmethod):
            fn, given = found.__func__, (cls, *passed)
        elif inspect.isfunction(found):
            fn, given = found, ("self", *passed)
        else:  # not defined, or a callable of another kind: left to run as it may
            continue
        if fn is getattr(Handle, name, None):
            continue
        where = f"Handle: {cls.__qualname__}.{name}"
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise ConfigError(f"{where} is async def: easyserve calls it in a worker's thread and would never run "
                              f"its coroutine; make it a plain def (code that must await can run in asyncio.run())")
        try:
            signature = inspect.signature(fn, follow_wrapped=False)  # what is called: a decorator's wrapper
        except (TypeError, ValueError):
            continue
        try:
            signature.bind(*given)
        except TypeError:
            raise ConfigError(f"{where}{signature} cannot be called as easyserve calls it, with "
                              f"({', '.join(passed)}): define it as def {name}(self, {', '.join(passed)})") from None


HEAVY_BYTES = 10 * 2**20  # a class sent by value larger than this is said to be: a model went with it


def _heaviest(cls: type) -> str:
    """The largest of the values ``cls`` takes with it (see :func:`_used`), as words for the warning."""
    sizes = []
    for label, value in _used(cls).items():
        with contextlib.suppress(Exception):
            sizes.append((len(cloudpickle.dumps(value)), label))
    size, label = max(sizes, default=(0, ""))
    return f", {size / 2**20:.0f} MB of it {label}" if size > HEAVY_BYTES // 2 else ""


def _unpicklable(cls: type) -> str | None:
    """Which of the globals ``cls``'s methods use (or the variables they close over, or its class
    attributes) cannot be pickled, as words for the error: pickle's own message names the object's
    type, not the name the author gave it, and a notebook's globals are many."""
    bad = []
    for label, value in _used(cls).items():
        try:
            cloudpickle.dumps(value)
        except Exception:
            kind = type(value)
            module = "" if kind.__module__ == "builtins" else kind.__module__ + "."
            bad.append(f"{label}, a {module}{kind.__qualname__}")
    if not bad:
        return None
    return "it uses " + (f"{', '.join(bad[:-1])} and {bad[-1]}" if len(bad) > 1 else bad[0])


def _used(cls: type) -> dict[str, Any]:
    """What ``cls`` takes with it when pickled by value, by the words that name each: the globals its
    methods read (and the code nested in them), the variables they close over, its class attributes;
    not itself nor its bases."""
    names: dict[str, Any] = {}
    for klass in cls.__mro__:
        for attribute, value in vars(klass).items():
            function = getattr(value, "__func__", value)  # a staticmethod's or classmethod's function
            code = getattr(function, "__code__", None)
            if code is None:
                if not attribute.startswith("__") and klass.__module__ == cls.__module__:
                    names.setdefault(f"the class attribute `{attribute}`", value)
                continue
            for name, cell in zip(code.co_freevars, function.__closure__ or ()):
                try:
                    names.setdefault(f"the variable `{name}` of the function that made it", cell.cell_contents)
                except ValueError:  # a cell not yet filled
                    pass
            stack = [code]
            while stack:  # the names its code and the code nested in it (lambdas, comprehensions) read
                code = stack.pop()
                stack.extend(c for c in code.co_consts if hasattr(c, "co_names"))
                for name in code.co_names:
                    if name in function.__globals__:
                        names.setdefault(f"the global `{name}`", function.__globals__[name])
    # not itself (super(), or named in a method), nor a base
    return {label: value for label, value in names.items() if not any(value is klass for klass in cls.__mro__)}


def _handle_folders(base_dir: Path) -> list[Path]:
    # Beside the config, one level up (configs/x.yaml in a project), and the working directory; for
    # each, handles/ (ours) before src/ (the original easy-serve's configs/ + src/handle.py layout).
    seen: list[Path] = []
    for root in (base_dir, base_dir.parent, Path.cwd()):
        for name in ("handles", "src"):
            folder = (root / name).resolve()
            if folder.is_dir() and folder not in seen:
                seen.append(folder)
    return seen


def _import_file(path: Path, source: bytes | None = None) -> Any:
    # A handle file may import its neighbours (the original's `from util import ...`). It is imported
    # under its own name, as they are, so that a spawned process can import what it is sent (a function
    # for a multiprocessing pool); under another only where that name is taken (a handle file named
    # json.py) or cannot be one. Its code is ``source`` where given, the file's text as the server read
    # it (see _read_source); its neighbours are read as they are now.
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    if name in sys.modules or not name.isidentifier():
        name = f"easyserve_handle_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if source is None:
        spec.loader.exec_module(module)
        return module
    _run_source(module, path, source)
    return module


def pin(ref: HandleRef) -> None:
    """In a worker, before anything imports it: the module of a ``module:Class`` handle whose text the server
    read (see :func:`_own_source`) is, from now on, that text, whoever imports it (a package's
    ``__init__`` that imports it, the HandleArgs' objects of its classes, the handle's own name).
    Run apart from the import system, it ran twice where the package imported it too: a registry that
    refuses a name twice failed every worker, and the package's copy of the class was another than the
    one served."""
    if ref.kind != "module" or ref.source is None or ref.origin is None:
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _Pinned)), None)
    if finder is None:
        finder = _Pinned()
        sys.meta_path.insert(0, finder)
    finder.modules[ref.target] = (ref.origin, ref.source)


class _Pinned:
    """A finder and loader for the modules :func:`pin` names: each one's text is the server's."""

    def __init__(self) -> None:
        self.modules: dict[str, tuple[str, bytes]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.modules:
            return None
        origin = self.modules[fullname][0]
        return importlib.util.spec_from_file_location(
            fullname, origin, loader=self,
            submodule_search_locations=[os.path.dirname(origin)] if Path(origin).stem == "__init__" else None)

    def create_module(self, spec: Any) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        origin, source = self.modules[module.__name__]
        _run_source(module, Path(origin), source)

    def invalidate_caches(self) -> None:
        pass


def _run_source(module: types.ModuleType, path: Path, source: bytes) -> None:
    """Run ``source``, the text of the file at ``path`` as the server read it, as ``module``'s code."""
    code = compile(source, str(path), "exec", dont_inherit=True)  # first: its SyntaxError names the file and line
    # tracebacks and inspect read these lines, not the file's (no mtime: linecache keeps them), split at
    # newlines alone, as the compiler counts them: str.splitlines also splits at a form feed, and every
    # line after one was shown for the line above it
    lines = io.StringIO(_decoded(source)).readlines()
    linecache.cache[str(path)] = (len(source), None, lines, str(path))
    exec(code, module.__dict__)
