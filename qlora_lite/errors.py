"""Errors a user can fix. The CLI prints their message and exits with `exit_code`; anything else is a bug."""


class UserError(Exception):
    """A bad input: recipe, file, column, model name, run directory. Exit status 2."""

    exit_code = 2


class BudgetError(UserError):
    """The recipe cannot fit the memory budget, or crossed it while training. Exit status 3."""

    exit_code = 3
