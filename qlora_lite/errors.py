"""Errors a user can fix. The CLI prints their message and exits with `exit_code`; anything else is a bug.
Also the pieces such messages share: a library exception in one line, and where a file stops being UTF-8."""


class UserError(Exception):
    """A bad input: recipe, file, column, model name, run directory. Exit status 2."""

    exit_code = 2


class BudgetError(UserError):
    """The recipe cannot fit the memory budget, or crossed it while training. Exit status 3."""

    exit_code = 3


class Interrupted(UserError):
    """Ctrl-C: what was saved and the command that continues. Exit status 130, as for any SIGINT."""

    exit_code = 130


def error_line(e: Exception) -> str:
    """An exception in one line, for a message that names the file it came from."""
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__


def utf8_text(raw: bytes) -> str:
    """The text of UTF-8 bytes (a byte-order mark, which Windows editors write, dropped); a ValueError saying
    "not UTF-8 text (byte 0xe9 on line 2)" otherwise."""
    body = raw.removeprefix(b"\xef\xbb\xbf")  # not "utf-8-sig": its error offsets would skip the mark
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body.count(b"\n", 0, e.start) + 1
        raise ValueError(f"not UTF-8 text (byte 0x{body[e.start]:02x} on line {line})") from None
