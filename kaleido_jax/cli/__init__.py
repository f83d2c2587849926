"""Command lines: flags -> config -> the library. The only package that prints user errors and exits with status 2
(``main.run_mode``); library modules raise their errors (ConfigError, StorageError, UserInputError, ...)."""
