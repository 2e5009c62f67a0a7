"""A real one-machine SLURM cluster for tests: ``munged``, ``slurmctld`` and two ``slurmd`` daemons (nodes n1
and n2, both at 127.0.0.1, CPU-only), from Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs
them). Processes are tracked by ``proctrack/linuxproc`` and no cgroup plugin is used, so it runs inside a
container. Several ``slurmd`` on one host is SLURM's "multiple slurmd" mode (``slurmd -N NODENAME``, a ``Port``
per node: https://slurm.schedmd.com/slurm.conf.html). Every daemon runs in the foreground under this process and
is stopped at teardown; all state lives in a temporary directory (``SLURM_CONF`` points the commands at it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={free_port()} CPUs={CPUS_PER_NODE} "
        "RealMemory=1000 State=UNKNOWN"
        for n in NODES
    )
    return f"""ClusterName=mllmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60.0) -> None:
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root))
        r = str(self.root)
        self._spawn(
            "munged",
            ["munged", "-F", "-f", f"--socket={r}/munge.sock", f"--key-file={key}", f"--log-file={r}/munged.log",
             f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed"],
        )  # fmt: skip
        self._wait(lambda: (self.root / "munge.sock").exists(), "munged's socket", timeout)
        conf = str(self.root / "slurm.conf")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", conf])
        self._wait(self._all_idle, "both nodes idle in sinfo", timeout)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def _all_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.split() == ["idle"] * len(NODES)

    def _wait(self, cond, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not cond():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} (exited: {dead}); logs in {self.root}")
            time.sleep(0.3)

    def cmd(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def job_state(self, job: str) -> tuple[str, str]:
        """(JobState, Reason) of ``job``."""
        fields = dict(
            item.split("=", 1) for item in self.cmd("scontrol", "show", "job", job).split() if "=" in item
        )
        return fields.get("JobState", "?"), fields.get("Reason", "?")

    def stop(self) -> None:
        """Cancel what is left and kill the daemons (a throw-away cluster: no state needs saving)."""
        self.cmd("scancel", "--full", "--user=root", check=False)
        for p in reversed(self.procs):
            p.kill()
            p.wait()
