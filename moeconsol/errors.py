"""What can go wrong with the user's input, as a small hierarchy (as huggingface_hub's
errors.py does it).

Every class here means "the user gave us something we cannot use", never a bug in
moeconsol. The CLI prints any of them as one line on stderr and exits with code 2; a library
caller can catch `MoeconsolError` for all of them, or one subclass to tell them apart:

    MoeconsolError
    ├── SettingsError            an option value out of range or inconsistent with another
    ├── UnsafePathError          a path or model name that would read or write outside the
    │                            directory it belongs to
    ├── SafetensorsError         a file that is not a valid safetensors file
    ├── CheckpointError          a directory that is not a usable checkpoint
    │   └── IncompatibleModelsError   checkpoints that cannot be consolidated together
    ├── ArtifactError            a directory that is not a usable artifact (corrupt manifest)
    │   └── DamagedArtifactError      a file of the artifact differs from its manifest entry
    ├── UnknownModelError        a model name the artifact does not hold
    └── OutputError              an output path that cannot or must not be written

Messages say what is wrong and what to do. A message names a setting by its Python parameter
in backticks ("replace it with `force`", "give `calibration` base=FILE"), never by a CLI
flag, so that it reads right from Python; the CLI writes each such name as the option the
user types ("replace it with --force", cli/messages.py). Where an error has a cause (an
OSError, a JSON error) it is raised `from` that cause.
"""


class MoeconsolError(Exception):
    """Bad input: a path, a checkpoint, an artifact, an option value. Never a bug in moeconsol."""


class SettingsError(MoeconsolError, ValueError):
    """An option value out of range (NaN included) or inconsistent with another option."""


class UnsafePathError(MoeconsolError):
    """A path read from a manifest or checkpoint index, or a model name, that is absolute,
    contains `..`, or would resolve outside the directory it belongs to."""


class SafetensorsError(MoeconsolError):
    """Not a valid safetensors file: truncated, corrupt header, overlapping tensors, not a
    regular file."""


class CheckpointError(MoeconsolError):
    """A directory that is not a usable checkpoint: no config.json, config or index not what
    Hugging Face writes, no safetensors weights, tensors that disagree with the config."""


class IncompatibleModelsError(CheckpointError):
    """Checkpoints that cannot be consolidated together (architecture, expert count, shapes,
    dtype); the message names the first difference."""


class ArtifactError(MoeconsolError):
    """A directory that is not a usable moeconsol artifact: missing, no manifest, a manifest
    that is not valid JSON or does not have the documented types."""


class DamagedArtifactError(ArtifactError):
    """A file of an artifact differs from its manifest entry (missing, wrong size, wrong
    sha256, wrong tensors): the artifact was damaged after it was written."""


class UnknownModelError(MoeconsolError, KeyError):
    """A model name the artifact (or the runtime) does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputError(MoeconsolError):
    """An output path that cannot be written (exists, no room, not a directory) or must not
    be replaced (an input of the command, a directory moeconsol did not write)."""


class MoeconsolWarning(UserWarning):
    """Suspicious but usable input (NaN, infinite or all-zero experts). The CLI prints it as
    one `moeconsol: warning:` line on stderr."""
