"""Generated gRPC stubs of the privface.v1 API (python -m privface.protogen)."""
