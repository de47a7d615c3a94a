"""Why slurm/curate.sbatch and slurm/preprocess.sbatch start their MPI ranks with MPICH's mpiexec, not
`srun --mpi=pmi2`: Slurm's pmi2 plugin reads a PMI-1 command in one 1024-byte read, so a longer `put`
arrives cut, and the value the other rank reads is damaged. MPICH's UCX address goes out in such puts
(up to ~900 bytes, varying from start to start); an unlucky start aborted both ranks
("value not properly terminated in client request", then a UCX assertion on the corrupt address).

A rank here speaks PMI-1 itself over PMI_FD, the way MPICH's client does, with values of a chosen length.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.slurm.jobs import wait_until_done

pytestmark = pytest.mark.slow

PMI_CLIENT = textwrap.dedent('''
    import os, socket, sys
    size = int(sys.argv[1])
    sock = socket.socket(fileno=int(os.environ["PMI_FD"]))
    sock.settimeout(10)  # a cut command may get no reply at all
    replies = sock.makefile("r")
    def ask(line):
        sock.sendall(line.encode())
        try:
            return replies.readline().strip()
        except TimeoutError:
            print(f"rank {os.environ['PMI_RANK']}: no reply to {line[:20]}...", flush=True)
            sys.exit(1)
    rank, world = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
    ask("cmd=init pmi_version=1 pmi_subversion=1\\n")
    kvs = ask("cmd=get_my_kvsname\\n").split("kvsname=")[1]
    ask(f"cmd=put kvsname={kvs} key=k{rank} value={str(rank) * size}\\n")
    ask("cmd=barrier_in\\n")
    other = (rank + 1) % world
    value = ask(f"cmd=get kvsname={kvs} key=k{other}\\n").split("value=")[-1]
    verdict = "intact" if value == str(other) * size else "damaged"
    report = os.environ.get("PMI_REPORT_DIR")  # under mpiexec the ranks' output lines can interleave
    if report:
        with open(os.path.join(report, f"rank{rank}-{size}.txt"), "w") as f:
            f.write(verdict)
    print(f"rank {rank} read {len(value)} of {size}:", verdict, flush=True)
    ask("cmd=finalize\\n")
''')


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pmi") / "pmi_client.py"
    path.write_text(PMI_CLIENT)
    return path


def test_srun_pmi2_cuts_a_pmi1_put_longer_than_1024_bytes(slurm_cluster, client):
    short = subprocess.run(["srun", "-N2", "-n2", "--mpi=pmi2", sys.executable, str(client), "900"],
                           capture_output=True, text=True, timeout=60)
    assert sorted(short.stdout.splitlines()) == [f"rank {r} read 900 of 900: intact" for r in (0, 1)], short.stderr
    long = subprocess.run(["srun", "-N2", "-n2", "--mpi=pmi2", sys.executable, str(client), "1100"],
                          capture_output=True, text=True, timeout=60)
    if long.stdout.count("intact") == 2 and "mpi/pmi2" not in long.stderr:
        pytest.skip("this Slurm's pmi2 plugin reads long PMI-1 commands whole (fixed upstream?): srun --mpi=pmi2 "
                    "would do again for the data scripts")
    assert "intact" not in long.stdout, long.stdout  # damaged, or no reply at all
    assert "mpi/pmi2: value not properly terminated in client request" in long.stderr  # slurmstepd's complaint


def test_the_data_scripts_launcher_passes_long_values_intact(slurm_cluster, client, tmp_path):
    """The launcher line of the data scripts: mpiexec beside the Python, inside a two-node allocation."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    for script in ("curate.sbatch", "preprocess.sbatch"):
        text = (Path(__file__).resolve().parents[2] / "slurm" / script).read_text()
        assert 'MPIEXEC=${PRETRAIN_MPIEXEC:-$(dirname "$(command -v "$PYTHON")")/mpiexec}' in text
        assert '"$MPIEXEC" -n "${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}}" "$PYTHON"' in text
        assert not [line for line in text.splitlines() if line.startswith("srun")]
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/bash\nexport PMI_REPORT_DIR={tmp_path}\n"
                   f"for size in 1100 3000; do {mpiexec} -n 2 {sys.executable} {client} $size; done\n")
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                                f"--output={tmp_path / 'out.txt'}", str(job)],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path, env=dict(os.environ))
    assert submitted.returncode == 0, submitted.stderr
    state = wait_until_done(submitted.stdout.strip().split(";")[0], timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert state["JobState"] == "COMPLETED", text
    verdicts = {path.stem: path.read_text() for path in tmp_path.glob("rank*.txt")}
    assert verdicts == {f"rank{r}-{n}": "intact" for r in (0, 1) for n in (1100, 3000)}, text
