"""User-facing errors: the command line prints these as one line and exits with code 2."""


class MedlvrError(ValueError):
    """A problem with the user's input (arguments, files, configuration), not a bug."""


class ImageError(MedlvrError):
    """An image file that cannot be read: unknown format, truncated, corrupt or too large."""
