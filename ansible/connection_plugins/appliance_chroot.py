# Managed by the appliance project: ansible/connection_plugins/appliance_chroot.py
"""Run Ansible tasks inside a directory tree: the converge test's "host".

Why not community.general.chroot: the project's checks must run offline and use ansible-core
alone (no collection to fetch). This plugin does the least that the converge test needs and
nothing more: run a command under ``chroot ROOT /bin/sh -c`` or, once the tree is booted as a
container (systemd-nspawn), under ``nsenter`` into that container's namespaces; and copy files in
and out through the host's view of ROOT. It is a test fixture, not a way to provision real hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
    name: appliance_chroot
    short_description: Run tasks inside a local directory tree with chroot(8)
    description:
        - Runs every command as root under C(chroot ROOT /bin/sh -c CMD) on the controller.
        - Files are copied through the controller's view of ROOT.
        - Used by the project's converge test against a debootstrap root; needs root on the controller.
    author: edge biometric appliance project
    options:
        remote_addr:
            description: Path of the root directory (ansible_host, else the inventory host name).
            type: str
            vars:
                - name: inventory_hostname
                - name: ansible_host
        init_pid:
            description:
                - PID (on the controller) of the init process of a container booted from the root.
                - When set, commands run in that container's namespaces (nsenter) instead of chroot.
            type: int
            default: 0
            vars:
                - name: ansible_appliance_chroot_init_pid
    extends_documentation_fragment:
        - connection_pipelining
"""

display = Display()

CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


class Connection(ConnectionBase):
    """A connection whose target is a directory on the controller, entered with chroot(8)."""

    transport = "appliance_chroot"
    has_pipelining = True
    default_user = "root"

    def _root(self) -> str:
        root = os.path.abspath(self.get_option("remote_addr"))
        if not os.path.isfile(os.path.join(root, "bin", "sh")):
            raise AnsibleConnectionFailure(f"{root} is not a root file system (no /bin/sh)")
        return root

    def _connect(self) -> Connection:
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure("the chroot connection needs root on the controller")
        self._root()
        self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        pid = int(self.get_option("init_pid") or 0)
        if pid:
            enter = [NSENTER, f"--target={pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--"]
            argv = [*enter, "/bin/sh", "-c", cmd]
        else:
            argv = [CHROOT, self._root(), "/bin/sh", "-c", cmd]
        display.vvv(f"EXEC {argv!r}", host=self._root())
        proc = subprocess.run(argv, input=in_data, capture_output=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def _inside(self, path: str) -> str:
        """The controller path of ``path`` inside the root; refuses to leave the root, also through
        a symlink in the root (an absolute link would otherwise point into the controller)."""
        root = os.path.realpath(self._root())
        full = os.path.join(root, path.lstrip("/"))
        if os.path.commonpath([root, os.path.realpath(os.path.dirname(full))]) != root:
            raise AnsibleError(f"{path} resolves outside the chroot {root}")
        return full

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        if not os.path.exists(to_bytes(in_path)):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._root())
        shutil.copyfile(in_path, self._inside(out_path))

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._root())
        shutil.copyfile(self._inside(in_path), out_path)

    def close(self) -> None:
        self._connected = False
