"""The MixEMError family: user-facing failures whose one-line message says what to do."""


class MixEMError(Exception):
    """A problem the user can fix; the CLI prints the message alone and exits 1."""


class ConfigError(MixEMError):
    """A bad option or config field (unknown key, out-of-range value, incompatible choice)."""


class DataError(MixEMError):
    """A dataset path, file or format that cannot be read."""


class CheckpointError(MixEMError):
    """A checkpoint that is missing, incomplete, or not in the safe format."""


class MissingDependencyError(MixEMError):
    """An optional dependency the requested feature needs is not installed."""


class TrainingDiverged(MixEMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def require(module: str, feature: str, install: str):
    """Import an optional dependency or raise a MissingDependencyError with the install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the Python package '{module}' ({e.__class__.__name__}: {e}); install it with: {install}"
        ) from None
