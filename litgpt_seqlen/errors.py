"""The one error a user causes: the entry point prints its message and exits 2, without a traceback."""


class UserInputError(Exception):
    """Bad input from the user (a flag, a data file, a checkpoint): the message names it and what to do."""
