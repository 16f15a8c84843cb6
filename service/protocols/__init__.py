"""One module per wire protocol: request parsing, validation, error texts and response formatting."""
