"""Object-store test servers (a package, so that its conftest is not the module `conftest` that tests/cluster imports from)."""
