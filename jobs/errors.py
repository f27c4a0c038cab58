"""What a user reads when a run fails: the message of the error a worker raised, out of Ray's wrapping.
Both the controller (orchestrator.launch) and a Tune trial (orchestrator.trial) say it this way."""

from __future__ import annotations


def root_message(error: BaseException) -> str:
    """The innermost worker exception's message, without Ray's wrapping."""
    seen = []
    cur: BaseException | None = error
    while cur is not None and cur not in seen:
        seen.append(cur)
        failures = getattr(cur, "worker_failures", None)  # Ray Train V2: {rank: the worker's exception}
        if isinstance(failures, dict) and failures:
            cur = failures[min(failures)]
            continue
        if isinstance(getattr(cur, "problems", None), list):  # a DataError: its rows, without the traceback
            return "\n".join(cur.problems)  # type: ignore[attr-defined]
        cur = cur.__cause__ or getattr(cur, "cause", None)
    for exc in reversed(seen):
        text = str(exc).strip()
        if text:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            return lines[-1] if len(lines) > 20 else text
    return repr(error)
