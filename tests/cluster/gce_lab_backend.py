"""A GceEmulator backend whose instances are lab VMs, so the whole GCE flow really runs.

Each inserted instance becomes a lab VM (`cluster.lab`) of the same name, reachable at the
lab's `{address_prefix}{N}:22`. Like a Compute Engine VM it runs its instance's
`startup-script` metadata at every boot, lets in the keys of its `ssh-keys` metadata
(what the guest agent does), and its real sshd host key is published as the `hostkeys/`
guest attribute. Stop, preemption and delete kill every process of the VM at once
(its PID 1); a start boots it again from the same disk with the same host key. A new
instance always gets a new disk. A lab VM that powers itself off (the guest's shutdown
runs `kill -TERM 1` there, cluster.labinit) makes its instance TERMINATED.

Hooks do their work before returning: a lab VM boots in a fraction of a second, and the
address and host key are then known, as they are on GCE once an insert is done.
"""
from __future__ import annotations

from gce_emulator import EmulatedVm

from cluster.lab import LabProvider
from cluster.provider import Status


class LabBackend:
    """See the module docstring. `lab` owns the VMs' disks and pids (its state dir)."""

    def __init__(self, lab: LabProvider) -> None:
        self.lab = lab

    def on_insert(self, vm: EmulatedVm) -> None:
        self.lab.delete([vm.name])  # a leftover disk of an earlier instance of that name
        metadata = vm.metadata
        (instance,) = self.lab.create(
            [vm.name],
            startup_script=metadata.get("startup-script", ""),
            authorized_keys=ssh_keys(metadata.get("ssh-keys", "")),
        )
        self._publish(vm, instance.address)

    def on_start(self, vm: EmulatedVm) -> None:
        (instance,) = self.lab.start([vm.name])
        self._publish(vm, instance.address)

    def on_stop(self, vm: EmulatedVm) -> None:
        self.lab.stop([vm.name])

    def on_preempt(self, vm: EmulatedVm) -> None:
        if vm.termination_action == "DELETE":
            self.lab.delete([vm.name])  # the instance is gone, and its boot disk with it
        else:
            self.lab.preempt([vm.name])

    def on_delete(self, vm: EmulatedVm) -> None:
        self.lab.delete([vm.name])

    def alive(self, vm: EmulatedVm) -> bool:
        """A lab VM that powered itself off (its guest shutdown) has no PID 1 any more."""
        return any(i.name == vm.name and i.status is Status.RUNNING for i in self.lab.list())

    def _publish(self, vm: EmulatedVm, address: str) -> None:
        keys = {}
        for line in self.lab.host_keys([vm.name])[vm.name]:
            _host, key_type, key = line.split()[:3]
            keys[key_type] = key
        vm.publish(address=address, host_keys=keys)


def ssh_keys(value: str) -> list[str]:
    """The public keys of an `ssh-keys` metadata value ("user:ssh-ed25519 AAAA... comment" lines)."""
    return [line.split(":", 1)[1].strip() for line in value.splitlines() if ":" in line]
