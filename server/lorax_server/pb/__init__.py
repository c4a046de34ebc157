"""Generated gRPC stubs (made by `make install` from proto/generate.proto; not committed)."""
