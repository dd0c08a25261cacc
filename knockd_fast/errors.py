"""The errors the stages raise to the command line.

A module with no dependencies, so that ``check-config`` loads nothing it does not need.
"""


class StartError(Exception):
    """The daemon cannot start (interface, firewall, state); the message is one line."""
