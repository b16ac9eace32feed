"""Errors the user can act on. The CLI turns them into exit code 2 and one line."""


class GPDError(Exception):
    """A bad input: a file, a spec, an option or a model the tool cannot use as given."""


class PlanError(GPDError):
    """A teacher file whose plan is missing, malformed or inconsistent with its tensors."""
