"""The one base of the errors a user can act on (a bad params value, a bad data
archive, a missing metrics file, an unsound certificate): a stage prints the
message on one line and exits with status 2 instead of a traceback.

It sits at the bottom of the package so that `cli.main` can catch every such
error without importing the stages that raise them (an import there would make
every stage's code inputs include them).
"""


class StageError(Exception):
    """An error whose message tells the user what to change."""
