"""The project's exception hierarchy: catch `OsnetTritonError` to catch anything we raise on purpose."""


class OsnetTritonError(Exception):
    """Base class of every error osnet-triton raises deliberately."""


class UnknownVariantError(OsnetTritonError, ValueError):
    """A model name that is not one of the OSNet variants we build."""


class CheckpointMismatchError(OsnetTritonError):
    """A checkpoint whose keys or shapes do not fit the chosen OSNet variant."""


class ExportMismatchError(OsnetTritonError):
    """An exported graph whose outputs differ from PyTorch's beyond tolerance."""
