from gradience_lite import AdapterFormatError as AuditError  # noqa: F401


# Upstream's other exception classes have no gradience_lite counterpart (nothing
# raises them); they exist here only so test modules that import them load.
class ConfigError(ValueError):
    pass


class DependencyError(RuntimeError):
    pass


class MergeError(ValueError):
    pass


class TelemetryError(ValueError):
    pass
