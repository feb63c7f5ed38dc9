import no_such_backend_package  # noqa: F401  (the import fails: this plugin is broken on purpose)
