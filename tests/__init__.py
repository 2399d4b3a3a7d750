"""The test suite; a package so tests and bench import `tests.fakehub` and `tests.helpers` by name."""
