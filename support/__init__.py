"""The run machinery of the suite, out of the lesson's way: a learner may skip this package entirely.
support/README.md says what each module does and who calls it."""
