"""JSON-lines rows: one object per line, of one kind, decided by its exact keys (`text`, optional
`label` and `source`; `prompt` and `completion`, optional `source`; `messages` of role and
content, optional `source`); any other key, a mix of kinds, or a value of the wrong type is
refused in one line naming the line."""

from __future__ import annotations

import json
from pathlib import Path


from trakwomp.errors import UserError


# A row's kind is decided by its exact keys: the kind's own, and optionally its others.
ROW_KINDS = {"text": (("text",), ("label", "source")), "prompt": (("prompt", "completion"), ("source",)),
             "messages": (("messages",), ("source",))}
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"


def read_jsonl(spec: str, path: str) -> list[dict]:
    """The objects of a JSON-lines file, all of one kind (`checked_row`). A UTF-8 byte-order mark
    at the start of the file is read as one."""
    if not Path(path).is_file():
        raise UserError(f"dataset spec {spec!r}: no file {path!r}")
    rows, first_kind = [], None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.removeprefix(BOM) if number == 1 else line
            if not line or line.isspace():
                continue
            row = parsed_line(line, f"{path}:{number}")
            kind = checked_row(row, f"{path}:{number}")
            first_kind = first_kind or (kind, number)
            if kind != first_kind[0]:
                raise UserError(f"{path}:{number}: a {kind} row, but line {first_kind[1]} is a {first_kind[0]} row; "
                                "give every row a \"text\", or every row a \"prompt\" and a \"completion\", or every "
                                "row \"messages\"")
            rows.append(row)
    if not rows:
        raise UserError(f"dataset spec {spec!r}: {path!r} holds no texts")
    return rows


def parsed_line(line: bytes, where: str):
    """One line's JSON value, or one line saying why it is not JSON that can be read."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise UserError(f"{where}: a number too long to read ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deep to read") from None


def row_kind(row, where: str) -> str:
    """The kind whose own keys `row` holds, refused unless it is exactly one kind's, with only
    that kind's optional keys besides."""
    kinds = [kind for kind, (own, _) in ROW_KINDS.items() if set(own) & set(row)] if isinstance(row, dict) else []
    if not kinds:
        raise UserError(f"{where}: each line must be a JSON object with a \"text\" field, or with \"prompt\" and "
                        "\"completion\" fields, or with \"messages\"")
    if len(kinds) > 1:
        raise UserError(f"{where}: the row mixes the keys of {' and '.join(kinds)} rows ({', '.join(sorted(row))}); "
                        "keep the keys of one kind (text; prompt and completion; or messages)")
    own, optional = ROW_KINDS[kinds[0]]
    missing = [key for key in own if key not in row]
    if missing:
        raise UserError(f"{where}: a row with a \"prompt\" needs a \"completion\" too, and the other way round")
    unknown = sorted(set(row) - set(own) - set(optional))
    if unknown:
        allowed = ", ".join(own + optional)
        raise UserError(f"{where}: a {kinds[0]} row takes the keys {allowed}, not {', '.join(map(repr, unknown))}")
    return kinds[0]


def checked_row(row, where: str) -> str:
    """The kind of a JSON-lines row (`row_kind`), checked field by field."""
    kind = row_kind(row, where)
    own, optional = ROW_KINDS[kind]
    if kind == "messages":
        check_messages(row["messages"], where)
    for field in own if kind != "messages" else ():
        if not isinstance(row[field], str) or not row[field]:
            raise UserError(f"{where}: \"{field}\" must be a non-empty string")
    for field in optional:
        if field in row and not isinstance(row[field], (str, int)):
            raise UserError(f"{where}: \"{field}\" must be a string or an integer")
    for field in (*own, *optional):
        if isinstance(row.get(field), str) and not is_text(row[field]):
            raise UserError(f"{where}: \"{field}\" holds a lone surrogate (an escape such as \\ud800 without its "
                            "pair), which is not text")
    return kind


def check_messages(messages, where: str) -> None:
    """A conversation: a list of {"role", "content"} messages, roles system, user or assistant,
    contents non-empty text, at least one assistant turn (what is predicted)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) \
                or not m["content"] or not is_text(m["content"]):
            raise UserError(f"{where}: each message must be {{\"role\": {' | '.join(ROLES)}, \"content\": non-empty "
                            f"text}}, got {json.dumps(m)[:80]}")
    if messages[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation begins with the assistant's turn; nothing prompts it (begin with "
                        "a system or user message)")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing in it is predicted")


def is_text(value: str) -> bool:
    """Whether `value` is text that UTF-8 can encode (JSON lets \\ud800 alone through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
