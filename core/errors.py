"""Typed errors. The command line turns `UserError` into one line and a non-zero exit; the server into a gRPC status."""


class UserError(Exception):
    """Something the user can fix (a missing file, a bad option); its message is shown as one line."""


class InvalidImage(UserError):
    """Bytes that do not decode to an image, or an image beyond the allowed size."""


class ManifestError(UserError):
    """A manifest that is missing, unreadable, or does not match the artifact it describes."""


class PairingError(UserError):
    """A student and an index (or teacher) that do not belong to the same teacher."""
