"""A data row as a conversation: the layouts rayft reads, checked and normalised into one shape.

Layouts (docs/data.md has an example of each):
- prompt/answer: `data.prompt` and `data.answer` columns; the row's image(s) in `data.image` (one image, or a
  list) or `data.images` (a list); a row whose image cell is null is a text row.
- chat: `data.messages`, a list of {role, content} with role system | user | assistant; content is a string
  or a list of parts, {"type": "text", "text": ...} and {"type": "image"} (the layout of Hugging Face chat
  templates, TRL and most public VLM sets). A part may carry its image itself ({"type": "image", "image":
  bytes | path | {bytes, path}}, or "path"/"url" to a local file, or OpenAI's {"type": "image_url"}), or the
  row's images come from a parallel column, `data.images`: one per image part, in order. With no image parts,
  a row's images go before the text of its first user message. A row with no images is a text row.

Every image is encoded bytes, a path relative to the data file, or Hugging Face datasets' {bytes, path}
struct. Needs nothing but the standard library: the controller and Ray Data tasks both call it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import DataConfig

ROLES = ("system", "user", "assistant")
IMAGE_PART = {"type": "image"}


class RowError(ValueError):
    """What is wrong with one row, and how to fix it."""

    def __init__(self, what: str, fix: str = ""):
        self.what, self.fix = what, fix
        super().__init__(what + (f" (fix: {fix})" if fix else ""))


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    """{role, content}; content is a list of parts: {"type": "text", "text": str} or {"type": "image"}."""
    images: list[Any]
    """The row's image cells, one per image part, in the order the parts appear."""
    trained: tuple[int, ...]
    """Indices of the assistant messages whose tokens carry the loss (the last message always does)."""

    def text(self, k: int) -> str:
        return "".join(p["text"] for p in self.messages[k]["content"] if p["type"] == "text")

    def images_per_message(self) -> list[int]:
        return [sum(p["type"] == "image" for p in m["content"]) for m in self.messages]


def conversation(row: dict[str, Any], cfg: DataConfig, vlm: bool) -> Conversation:
    """The row as a Conversation. vlm: the model reads images (a text model refuses a row that has some).
    Raises RowError saying what is wrong and the fix."""
    if cfg.messages:
        messages, inline = _messages(row.get(cfg.messages), cfg.messages)
    else:
        messages, inline = _prompt_answer(row, cfg), []
    if vlm:
        images = _images(row, cfg, messages, inline)
    else:
        if any(p["type"] == "image" for m in messages for p in m["content"]):
            raise RowError("the row has image parts, but the model reads text only", "remove the image parts, or fine-tune a vision-language model")
        images = []
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    trained = tuple(answers) if cfg.train_on == "all_turns" else (answers[-1],)
    return Conversation(messages, images, trained)


def _prompt_answer(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    prompt, answer = row.get(cfg.prompt), row.get(cfg.answer)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(f"empty prompt (column `{cfg.prompt}`)", "give every row a question, or drop the row")
    if not isinstance(answer, str) or not answer.strip():
        raise RowError(f"empty answer (column `{cfg.answer}`)", "give every row an answer, or drop the row")
    return [{"role": "user", "content": [_text(prompt)]}, {"role": "assistant", "content": [_text(answer)]}]


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _messages(raw: Any, col: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """(normalised messages, the images their parts carry: one entry per image part, None where a part
    carries none)."""
    if isinstance(raw, str):  # a JSON string, as some JSONL and CSV exports store it
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise RowError(f"column `{col}` holds a string that is not a JSON list of messages", "store a list of {role, content} messages") from None
    if not isinstance(raw, list | tuple) or not raw:
        raise RowError(f"no messages (column `{col}`)", "give each row a list of {role, content} messages ending with the assistant's answer")
    messages, inline = [], []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"message {k} is {type(m).__name__}, not a {{role, content}} mapping (column `{col}`)", "store each message as {role, content}")
        role = m.get("role")
        if role not in ROLES:
            fix = "use role/content keys (ShareGPT's from/value: human -> user, gpt -> assistant)" if "from" in m else "use role system, user or assistant"
            raise RowError(f"message {k} has role {role!r}, not system, user or assistant (column `{col}`)", fix)
        parts, images = _parts(m.get("content"), k, col)
        if role == "assistant" and images:
            raise RowError(f"message {k}: an assistant message holds an image (column `{col}`)", "put images in user messages")
        messages.append({"role": role, "content": parts})
        inline.extend(images)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"the last message must be the assistant's answer (column `{col}`)", "end each conversation with the assistant message to train on")
    first = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first]):
        raise RowError(f"no user message before the first answer (column `{col}`)", "start each conversation with a user message (after any system message)")
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and not "".join(p["text"] for p in m["content"] if p["type"] == "text").strip():
            raise RowError(f"message {k}: empty answer (column `{col}`)", "give every assistant message text, or drop the row")
    return messages, inline


def _parts(content: Any, k: int, col: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """A message's content as parts, and the image each image part carries (None: a placeholder)."""
    if isinstance(content, str):
        return [_text(content)], []
    if not isinstance(content, list | tuple):
        raise RowError(f"message {k} has no content (column `{col}`)", "give content as a string or a list of {type: text|image} parts")
    parts: list[dict[str, Any]] = []
    images: list[Any] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if isinstance(p, str):
            parts.append(_text(p))
        elif kind == "text":
            if not isinstance(p.get("text"), str):
                raise RowError(f"message {k} part {j}: a text part without text (column `{col}`)", 'write text parts as {"type": "text", "text": "..."}')
            parts.append(_text(p["text"]))
        elif kind in ("image", "image_url"):
            parts.append(dict(IMAGE_PART))
            images.append(_part_image(p))
        else:
            what = "videos are not supported" if kind == "video" else f"type {kind!r} is not text or image"
            raise RowError(f"message {k} part {j}: {what} (column `{col}`)", 'use {"type": "text", "text": ...} and {"type": "image"} parts')
    return parts, images


def _part_image(p: dict[str, Any]) -> Any:
    """The image an image part carries: HF/TRL `image`, a `path` or `url`, OpenAI's image_url.url; None if none."""
    for key in ("image", "path", "url"):
        if p.get(key) not in (None, ""):
            return p[key]
    url = p.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def _cells(value: Any) -> list[Any]:
    """An image column's cell as a list of images: null -> none, a list as is, one image -> [it]."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _images(row: dict[str, Any], cfg: DataConfig, messages: list[dict[str, Any]], inline: list[Any]) -> list[Any]:
    """The row's images in part order; inserts image parts into the first user message when the messages
    have none (prompt/answer rows, or chat rows whose images sit only in a column)."""
    column = cfg.images or (cfg.image if cfg.image in row else None)
    cells = _cells(row.get(column)) if column else []
    n_parts = sum(p["type"] == "image" for m in messages for p in m["content"])
    carried = [x for x in inline if x is not None]
    if carried:
        if len(carried) != len(inline):
            raise RowError(f"{len(inline) - len(carried)} of {len(inline)} image parts carry no image", "give every image part its image, or take them all from data.images")
        if cells:
            raise RowError(f"images both in the message parts and in column `{column}`", f"keep one: drop the parts' images, or the column (data.{'images' if cfg.images else 'image'})")
        return carried
    if n_parts == 0:
        if cells:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"][:0] = [dict(IMAGE_PART) for _ in cells]
        return cells
    if column is None:
        raise RowError(
            f"{n_parts} image part(s) but no images",
            'set data.images to the column holding each row\'s list of images, or put each image in its part ({"type": "image", "image": ...})',
        )
    if n_parts != len(cells):
        raise RowError(f"{n_parts} image part(s) in the messages but {len(cells)} image(s) in column `{column}`", 'give one image per {"type": "image"} part, in order')
    return cells
