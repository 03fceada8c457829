"""The one exception tree of edgepack.

    EdgepackError                 base; carries an exit code and an HTTP status for the edges
    ├── ConfigError               a config, profile or command-line value is invalid (exit 2)
    │   ├── ProfileError          a hardware profile cannot be found or does not validate
    │   └── MissingExtra          a command needs an extra (`pip install 'edgepack[fleet]'`) that is not installed
    ├── DataError                 calibration/validation data is missing or does not match the model
    ├── ModelError                the model cannot be loaded, checked or converted (exit 2)
    │   └── UnsupportedOpError    an op the target runtime cannot run; names the op and node
    ├── PassError                 a build pass failed for a reason that is not the user's input
    ├── GateFailed                a quality gate or verification failed (exit 1)
    ├── BundleError               a bundle is malformed, unsafe or does not verify (exit 1)
    │   ├── SignatureError        the signature is missing, invalid, or from an unknown key
    │   ├── IntegrityError        a member's hash or size does not match the manifest
    │   └── UnsafeMemberError     a member with an absolute path, `..`, or a link
    ├── ProtocolError             a malformed or unknown protocol message
    └── ApiError                  a request the fleet API refuses for a reason of its own
        ├── NotAuthenticated      no credential, or one the server does not know (HTTP 401)
        ├── PermissionDenied      a known credential that may not do this (HTTP 403)
        ├── NotFound              the named bundle, device, rollout or token does not exist (HTTP 404)
        ├── Conflict              the request clashes with the current state (HTTP 409)
        ├── PayloadTooLarge       an upload larger than the server accepts (HTTP 413)
        ├── RangeNotSatisfiable   a download Range that lies outside the file (HTTP 416)
        ├── BrokerUnavailable     the MQTT broker did not take a device identity change (HTTP 503)
        └── StoreUnavailable      the S3-compatible bundle store did not answer or refused us (HTTP 503)

Only the edges (CLI, API) translate these into exit codes, status codes or log lines.
`first_validation_error` turns a pydantic ValidationError into the one line those edges print.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is only needed by callers that already hold a ValidationError
    from pydantic import ValidationError


class EdgepackError(Exception):
    """Base class of every error edgepack raises on purpose."""

    exit_code: int = 2
    http_status: int = 400

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class ConfigError(EdgepackError):
    """A config file, profile or command-line value is invalid."""


class ProfileError(ConfigError):
    """A hardware profile cannot be found or does not validate."""


class MissingExtra(ConfigError):
    """A command needs an optional extra that is not installed (attributes: command, extras, module)."""


class DataError(EdgepackError):
    """Calibration or validation data is missing, unreadable or does not match the model's inputs."""


class ModelError(EdgepackError):
    """A model cannot be loaded, checked or converted."""


class UnsupportedOpError(ModelError):
    """The model uses an op the target runtime cannot run (attributes: op_type, node_name, runtime)."""


class PassError(EdgepackError):
    """A build pass failed on valid input (attribute: pass_name)."""

    exit_code = 1
    http_status = 500


class GateFailed(EdgepackError):
    """A quality gate or verification failed; the report says which and why."""

    exit_code = 1
    http_status = 422


class BundleError(EdgepackError):
    """A bundle is malformed, unsafe, or does not verify."""

    exit_code = 1
    http_status = 400


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid, or made with a key that is not trusted."""


class IntegrityError(BundleError):
    """A bundle member's hash or size does not match the manifest (attribute: member)."""


class UnsafeMemberError(BundleError):
    """A bundle member has an absolute path, a `..` component, or is a link or device."""


class ProtocolError(EdgepackError):
    """A protocol message is malformed or carries an unknown schema version."""


class ApiError(EdgepackError):
    """A request the fleet API refuses for a reason of its own (not a bundle, config or protocol error)."""


class NotAuthenticated(ApiError):
    """No credential, a malformed one, or one the server does not know."""

    http_status = 401


class PermissionDenied(ApiError):
    """A known credential whose role or device does not allow this request."""

    http_status = 403


class NotFound(ApiError):
    """The named bundle, device, rollout or token does not exist."""

    http_status = 404


class Conflict(ApiError):
    """The request clashes with the current state (e.g. a rollout that is already finished)."""

    http_status = 409


class PayloadTooLarge(ApiError):
    """An upload larger than the server's limit."""

    http_status = 413


class RangeNotSatisfiable(ApiError):
    """A download Range that lies outside the file (attribute: size)."""

    http_status = 416


class BrokerUnavailable(ApiError):
    """The MQTT broker did not confirm a device identity change (enrollment, rotation, revocation)."""

    http_status = 503


class StoreUnavailable(ApiError):
    """The bundle store (an S3-compatible bucket) did not answer or refused the fleet's credentials."""

    http_status = 503



# ---------------------------------------------------------------------------------------------------
# one line for a validation error

_MAX_SHOWN_INPUT = 60


def validation_error_field(exc: ValidationError) -> str:
    """Where the first problem of `exc` is, as a dotted path with list indices in brackets: `io.inputs[0].shape`."""
    text = ""
    for part in exc.errors()[0]["loc"]:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def first_validation_error(exc: ValidationError, source: str, *, count_others: bool = False) -> str:
    """The first problem of a pydantic ValidationError as one line naming the field.

    `manifest.json: field 'io.inputs' is missing`, `edgepack.yaml: unknown field 'gates.max_size'`,
    `agent.yaml: field 'port': Input should be a valid integer (got 'x')`. With `count_others` a
    `(+2 more problems)` suffix says the fix may not be the last one.
    """
    errors = exc.errors()
    first = errors[0]
    where = validation_error_field(exc)
    if first["type"] == "missing":
        line = f"{source}: field '{where}' is missing"
    elif first["type"] == "extra_forbidden":
        line = f"{source}: unknown field '{where}'"
    else:
        problem = str(first["msg"]).removeprefix("Value error, ")
        shown = first.get("input")
        if shown is not None and not isinstance(shown, (dict, list)):
            text = repr(shown)
            problem += f" (got {text if len(text) <= _MAX_SHOWN_INPUT else text[:_MAX_SHOWN_INPUT] + '…'})"
        line = f"{source}: field '{where}': {problem}"
    more = len(errors) - 1
    if count_others and more:
        line += f" (+{more} more problem{'s' if more > 1 else ''})"
    return line.replace("\n", " ")


def first_line(exc: BaseException) -> str:
    """An exception's message as one line of at most 200 characters; its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def one_line_reason(exc: BaseException) -> str:
    """Why something failed, for a report or a log line: an EdgepackError's own message (written for users),
    else the exception's type and first line (`ValueError: …`), which is all a foreign library's error says."""
    if isinstance(exc, EdgepackError):
        return exc.message
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc)}" if text else type(exc).__name__
