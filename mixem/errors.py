"""The MixEMError family: user-facing failures whose one-line message says what to do."""

import errno


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


class OutputFolderError(MixEMError):
    """An output folder that another process owns, that holds files not ours, or that cannot be written."""


class WriteError(OutputFolderError, OSError):
    """A file that could not be written (disk full, read-only, ...): one line naming it, and still an OSError."""


# What to do about the OS errors a user can fix, by errno (the rest say the system's own words).
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space there, or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free some space, or choose a folder on another disk",
    errno.EROFS: "read-only file system: choose a folder you can write to",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "this is a folder, where a file is needed",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "a file of this name is in the way",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENAMETOOLONG: "the path is too long for this file system",
}


def describe_os_error(e: OSError, path=None) -> str:
    """One line for an OS error: the file it concerns, what happened and what to do."""
    where = path or e.filename
    if where is not None and getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    code = e.errno
    if code is None and "No space left" in str(e):  # pyarrow's writers raise OSError without an errno
        code = errno.ENOSPC
    what = _OS_ADVICE.get(code) or (e.strerror or str(e) or type(e).__name__)
    return f"{where}: {what}" if where is not None else what
