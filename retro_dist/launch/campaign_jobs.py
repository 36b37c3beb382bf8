"""A campaign on a Ray cluster: each run is its own Ray job (`ray job submit`), `parallel` at a time.

Every job runs `retro-dist campaign --spec SPEC --only RUN --address auto` in this command's working
directory, so the spec, configs, models and `output_dir` must be on storage the head node sees (the
same rule as for a single run). A job that fails is reported with the tail of its logs; the others
go on, and running the campaign again retries only what did not finish.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path


def submit_and_wait(camp, runs, address: str, parallel: int, poll_s: float = 3.0) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    queue = [r for r in runs if not (camp.folder / r.name / f"eval-{camp.eval['split']}" / "eval.json").is_file()]
    running: dict[str, str] = {}  # job id -> run name
    failed = []
    spec = str(Path(camp.spec_path).resolve())
    exe = shlex.quote(str(Path(sys.executable).with_name("retro-dist")))
    while queue or running:
        while queue and len(running) < max(1, parallel):
            run = queue.pop(0)
            entry = (f"cd {shlex.quote(os.getcwd())} && {exe} campaign --spec {shlex.quote(spec)} "
                     f"--only {shlex.quote(run.name)} --address auto")
            job = client.submit_job(entrypoint=entry, submission_id=f"{camp.name}-{run.name}-{int(time.time())}")
            running[job] = run.name
            print(f"campaign {camp.name}: submitted {run.name} as Ray job {job}", flush=True)
        time.sleep(poll_s)
        for job, name in list(running.items()):
            status = client.get_job_status(job)
            if status.is_terminal():
                del running[job]
                print(f"campaign {camp.name}: {name}: {status.value}", flush=True)
                if status != JobStatus.SUCCEEDED:
                    tail = "\n".join(client.get_job_logs(job).splitlines()[-5:])
                    failed.append(f"{name} (job {job}, {status.value}): {tail}")
    if failed:
        raise RuntimeError(f"campaign {camp.name}: {len(failed)} run(s) failed; run the campaign again to retry "
                           f"them:\n" + "\n".join(failed))
