"""conformance: the backend-agnostic conformance suite."""
