"""One module per ``capvis`` subcommand; :mod:`capvis.cli` discovers them by file name."""
