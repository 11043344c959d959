"""The one exception the data code raises for bad input."""


class DataError(ValueError):
    """Bad or unusable input data. The message names the file (and line) and says what to do."""
