"""The conformance cases, one module per contract area (see ``cases.SUITE_MODULES``)."""
