"""Operations: the `depthd` command line, the daemon's life under systemd, installation, logs."""
