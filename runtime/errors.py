"""Typed errors. Every failure a user can cause is an `AdgenError` with a message that names
what was wrong and what was expected; the CLI prints the message and exits non-zero."""

from __future__ import annotations


class AdgenError(Exception):
    """Base of every error adgen raises on purpose."""

    exit_code = 1


class RuleError(AdgenError):
    """A named field broke a rule: `field: rule (got value)`, the field qualified by `where`."""

    def __init__(self, field: str, rule: str, got: object | None = None, where: str | None = None):
        self.field = field
        self.rule = rule
        self.got = got
        message = f"{where or field}: {rule}"
        if got is not None:
            message += f" (got {got})"
        super().__init__(message)


class InputError(RuleError, ValueError):
    """A request field broke a rule: `field: rule (got value)`."""

    exit_code = 2


class SpecError(AdgenError, ValueError):
    """A tensor did not match its component spec: `component.tensor: expected X, got Y`."""

    exit_code = 2

    def __init__(self, component: str, tensor: str, expected: str, got: str):
        self.component = component
        self.tensor = tensor
        super().__init__(f"{component}.{tensor}: expected {expected}, got {got}")


class ConfigError(RuleError):
    """A generated Triton model config that tritonserver would refuse at load, or that would load
    and mean nothing: `model.field: rule (got value)`. Raised at generation, not at server start."""

    def __init__(self, model: str, field: str, rule: str, got: object | None = None):
        self.model = model
        super().__init__(field, rule, got, where=f"{model or '(unnamed model)'}.{field}")


class RequestCancelled(AdgenError):
    """The client of a request in the server went away or its deadline passed: the request stops at
    its next component call (within one step of any loop)."""


class WeightsError(AdgenError):
    """Weights missing, unreadable, unsafe, or whose keys/shapes do not match the network."""


class ExportError(AdgenError):
    """Exporting a component failed."""


class ParityError(ExportError):
    """An exported graph disagrees with its torch reference beyond the precision's tolerance."""


class BackendError(AdgenError):
    """A backend is not installed, cannot load a component, or failed to run it."""


class ServerError(BackendError):
    """A Triton server answered with an error: `status` is the HTTP code or gRPC status name."""

    retriable = False

    def __init__(self, message: str, status: str = ""):
        self.status = status
        super().__init__(message)


class ServerRequestError(ServerError):
    """The server refused the request itself (HTTP 400 / INVALID_ARGUMENT): fix it, do not retry."""

    exit_code = 2


class ServerAccessError(ServerError):
    """A restricted endpoint without the operator's key (HTTP 403; gRPC answers UNAVAILABLE)."""


class ServerBusyError(ServerError):
    """The model's queue is full or a request waited past its queue timeout (HTTP 503 /
    UNAVAILABLE): retriable after a pause."""

    retriable = True


class ServerUnavailableError(ServerError):
    """No answer (connection refused or reset: server restarting) or a crashed Python stub that
    the watchdog is replacing: retriable."""

    retriable = True
