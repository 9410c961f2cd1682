"""What runs on a worker VM: the agent, its metrics sampler and verdicts (stdlib and psutil), and the
boot, mount and idle-guard scripts (boot.sh, mount.sh, watchdog.sh) as package data."""
