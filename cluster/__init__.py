"""Where work runs: providers that create and delete VMs, SSH fan-out, the SSHFS mount."""
