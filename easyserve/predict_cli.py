"""``easyserve predict``: one request from the shell, its answer printed as JSON or written to a file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .answers import one_line, shown
from .client import Client
from .errors import EasyServeError
from .npy import to_npy
from .sending import is_file, own_headers, short_name


def run_predict(url: str, file: str | None = None, data: str | None = None, timeout: float | None = 60.0,
                api_key: str | None = None, output: Path | None = None, max_answer_mb: float | None = 1024,
                header: Sequence[str] = (), npy: bool = False) -> int:
    """``easyserve predict URL [FILE] [--data JSON] [-o OUTPUT] [-H 'Name: value']... [--npy]``: print the
    answer as JSON, or write it to ``output``; a binary answer goes to standard output only where that is
    not a terminal. With ``npy`` (or an ``output`` named ``.npy``), an array answer is asked for as ``.npy``.
    A ``timeout`` of 0 (or ``None``, or inf) waits for ever. Returns the exit status."""
    import typer

    def usage(message: str) -> int:  # the command's mistake, as the CLI's own: exit status 2
        typer.secho(message, fg=typer.colors.RED, err=True)
        return 2

    fields, problem = _read_json(data) if data else ({}, None)
    if problem:
        return usage(f"--data is {problem}")
    if not isinstance(fields, dict):
        return usage(f"--data must be a JSON object such as '{{\"x\": [1, 2]}}', got {one_line(data, 60)!r}")
    if file is None and not data:
        return usage("nothing to send: give a FILE (an image, a .json file, - for standard input) or --data JSON")
    if timeout is not None and not timeout >= 0:
        return usage(f"--timeout: expected seconds, 0 or more (0 waits for ever), got {timeout:g}")
    if max_answer_mb is not None and not max_answer_mb > 0:
        return usage(f"--max-answer-mb: expected megabytes above 0, got {max_answer_mb:g}")
    if api_key and not api_key.isprintable():  # in the command's words: Client names its own argument
        return usage("--api-key: expected a key without line breaks or control characters (value hidden)")
    headers = {}
    for line in header:
        name, colon, value = line.partition(":")
        if not colon:
            return usage(f"--header: expected 'Name: value', got {one_line(line, 60)!r}")
        headers[name.strip()] = value.strip()
    try:
        own_headers(headers)
    except ValueError as exc:
        return usage("--header" + str(exc).removeprefix("headers"))
    source: Any = file
    if file not in (None, "-") and not is_file(file):  # said in the command's words, not Client's
        typer.secho(shown(f"no file {short_name(file)!r} to send (to send JSON, give it with --data '{{...}}'; "
                           "- reads standard input)"), fg=typer.colors.RED, err=True)
        return 1
    piped = file not in (None, "-") and not Path(file).is_file()  # <(cmd), /dev/stdin on a pipe: read as - is
    if file == "-" or piped:
        try:
            source = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as exc:
            typer.secho(shown(f"cannot read {short_name(file)!r}: {exc.strerror or exc}"), fg=typer.colors.RED,
                        err=True)
            return 1
        if _starts_an_object(source):  # a JSON object, sent as JSON (as a .json file is), not as bytes
            source, problem = _read_json(source)
            if problem:
                where = "standard input" if file == "-" else short_name(file)
                return usage(f"{where} starts like a JSON object but is {problem}")
    if file is None:  # --data alone is the body, {} too (a handle whose options are in the URL's query)
        source, fields = fields, {}
    try:
        npy = npy or (output is not None and output.suffix.lower() == ".npy")
        with Client(url, timeout=timeout or None, api_key=api_key, max_answer_mb=max_answer_mb,
                    headers=headers, npy=npy) as client:
            client._larger = "--max-answer-mb MB"
            answer = client.predict(source, **fields)
    except EasyServeError as exc:
        status = vars(exc).get("status")  # the status the server answered; not a class's own (a Timeout's 504)
        message = f"{status} error: {exc}" if status else str(exc)
        if status == 401:  # the server's words are for any client: this command takes the key so
            message += " (give it in $EASYSERVE_API_KEY, or with --api-key KEY, which every user of the machine sees)"
        named = vars(exc).get("request_id")
        typer.secho(shown(message + (f" (request {named})" if named and status >= 500 else "")),
                    fg=typer.colors.RED, err=True)
        return 1
    except (OSError, ValueError, TypeError) as exc:
        typer.secho(shown(str(exc)), fg=typer.colors.RED, err=True)
        return 1
    if isinstance(answer, np.ndarray) and (output is not None or sys.stdout is None or not sys.stdout.isatty()):
        answer = to_npy(answer) or b""  # an .npy answer, written as it came (it was a traceback)
    elif isinstance(answer, np.ndarray):  # on a terminal: its values, as JSON
        answer = answer.tolist()
    if not isinstance(answer, bytes):
        try:
            text = pretty_json(answer)
        except RecursionError:  # nested too deeply to indent: on one line
            text = json.dumps(answer, ensure_ascii=False)
        text = _C1.sub(lambda found: f"\\u{ord(found[0]):04x}", text)  # in strings only: JSON escapes the rest
        if output is None:
            return _to_stdout(lambda: typer.echo(text))
        if npy:  # the server answered JSON: no array to write as .npy
            typer.secho(f"the answer is JSON, not an array: {output} holds it as JSON", fg=typer.colors.YELLOW,
                        err=True)
        answer = (text + "\n").encode()
    elif output is None:
        if sys.stdout is not None and sys.stdout.isatty():
            typer.secho(f"the answer is {len(answer):,} bytes that are not JSON (an image, a file): write them with "
                        "--output FILE, or redirect standard output", fg=typer.colors.RED, err=True)
            return 1
        return _to_stdout(lambda: sys.stdout.buffer.write(answer))
    try:
        output.write_bytes(answer)
    except OSError as exc:
        typer.secho(f"cannot write the answer to {output}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
        return 1
    return 0


def _to_stdout(write: Callable[[], Any]) -> int:
    """``write`` the answer to standard output and flush it: 0, or 1 saying why it could not be (a full
    disk, no standard output at all), where a full disk was a traceback and a closed output exited 0 with
    the answer lost. A reader that left (``| head``) is told as before, by ``BrokenPipeError``."""
    import typer

    try:
        if sys.stdout is None:
            raise OSError("there is none (closed)")
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        typer.secho(f"cannot write the answer to standard output: {exc.strerror or exc}; write it with --output FILE",
                    fg=typer.colors.RED, err=True)
        return 1
    return 0


def _starts_an_object(raw: bytes) -> bool:
    """Whether ``raw`` begins like a JSON object, in any encoding JSON allows, after a byte order mark
    (PowerShell writes one, and UTF-16; such input was sent as bytes)."""
    head = raw[:64].decode(json.detect_encoding(raw[:64]), "replace")  # a byte no text has stays in the way
    return head.lstrip("\ufeff \t\r\n")[:1] == "{"


def _read_json(text: str | bytes) -> tuple[Any, str | None]:
    """The value ``text`` holds, or what is wrong with it (for a message)."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "nested too deeply to read"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"


_C1 = re.compile(r"[\x7f-\x9f]")  # the ones JSON leaves as they are (the 8-bit CSI among them)


def pretty_json(value: Any, indent: int = 0, width: int = 120) -> str:
    """JSON for people: what fits in ``width`` columns stays on one line (a box, one detection), the
    rest is indented, one item a line."""
    flat = json.dumps(value, ensure_ascii=False)
    if indent + len(flat) <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {pretty_json(v, indent + 2, width)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + pretty_json(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
