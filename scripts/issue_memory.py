#!/usr/bin/env python3
"""Resident memory per issue: starts a server, opens ISSUES issues in one project (bulk requests
of 100 events with unique messages of TITLE_BYTES bytes), and prints the server's RSS growth per
issue, then the same after a restart on the same store.

Usage: scripts/issue_memory.py [--issues N] [--title-bytes N] [--database-url URL] [--binary PATH]

Without --database-url the SQLite store is used; its own page cache (up to 32 MiB) then counts
too, so PostgreSQL shows the issues alone more exactly. The server runs with
MIMALLOC_PURGE_DELAY=0, so memory the requests and the start-up load used and freed goes back to
the kernel at once and the readings (after 3 s of quiet) count what stays.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

ADMIN_TOKEN = "issue-memory-token"


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def settled_rss(pid):
    time.sleep(3)
    readings = []
    for _ in range(5):
        readings.append(rss_bytes(pid))
        time.sleep(0.2)
    return min(readings)


def start(binary, data_dir, database_url, max_issues):
    command = [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
               "--admin-token", ADMIN_TOKEN, "--shards", "1",
               "--max-issues-per-project", str(max_issues)]
    if database_url:
        command += ["--database-url", database_url]
    environment = dict(os.environ, MIMALLOC_PURGE_DELAY="0")
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    for line in server.stderr:
        if line.startswith("mesher listening on http://"):
            return server, line.split("http://", 1)[1].strip()
    raise RuntimeError("server did not start")


def call(addr, method, path, key, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{addr}{path}", data=data, method=method,
                                     headers={"authorization": f"Bearer {key}",
                                              "content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--issues", type=int, default=100_000)
    parser.add_argument("--title-bytes", type=int, default=40)
    parser.add_argument("--database-url")
    parser.add_argument("--binary", default="target/release/mesher")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="mesher-issue-memory-")
    try:
        server, addr = start(args.binary, data_dir, args.database_url, args.issues + 1)
        project = call(addr, "POST", "/api/v1/projects", ADMIN_TOKEN,
                       {"name": f"issue memory {os.getpid()}"})
        key = project["ingest_key"]
        call(addr, "POST", "/api/v1/events", key, {"message": "warm-up"})
        baseline = settled_rss(server.pid)

        padding = "x" * max(0, args.title_bytes - 20)
        for first in range(0, args.issues, 100):
            events = [{"message": f"issue {n:012d} {padding}"}
                      for n in range(first, min(first + 100, args.issues))]
            call(addr, "POST", "/api/v1/events/bulk", key, events)
        grown = settled_rss(server.pid) - baseline
        print(f"{args.issues} issues, titles of {min(args.title_bytes, 1024)} bytes: "
              f"RSS {baseline >> 20} MiB -> +{grown / 2**20:.1f} MiB, "
              f"{grown / args.issues:.0f} bytes per issue")

        server.terminate()
        server.wait(30)
        server, addr = start(args.binary, data_dir, args.database_url, args.issues + 1)
        reloaded = settled_rss(server.pid) - baseline
        print(f"after a restart: +{reloaded / 2**20:.1f} MiB over the first baseline, "
              f"{reloaded / args.issues:.0f} bytes per issue")
        server.terminate()
        server.wait(30)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
