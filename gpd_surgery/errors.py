"""Errors the user can act on. The CLI turns them into exit code 2 and one line."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one short line (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class GPDError(Exception):
    """A bad input: a file, a spec, an option or a model the tool cannot use as given."""


class PlanError(GPDError):
    """A teacher file whose plan is missing, malformed or inconsistent with its tensors."""
