"""Load test of the search service: C concurrent clients for S seconds, with batching on and off.

  python -m jaxret.train --config configs/demo.py --workdir /tmp/jaxret_demo
  python -m jaxret.index --workdir /tmp/jaxret_demo --uri /tmp/demo_catalog.db
  python -m bench.serve_load --workdir /tmp/jaxret_demo --uri /tmp/demo_catalog.db [--clients 1 8 64] [--seconds 20]

For each setting (batching on: `--max_batch 32 --max_wait_ms 5`; off: `--max_batch 1`) the bench starts
`python -m jaxret.serve` on a free port of 127.0.0.1 (loopback only; with a Milvus Lite catalogue each server
gets its own copy of the database), waits until it answers /healthz (model compiled) and warms it up. Then,
for each C, the settings take turns (`--repeat` times each), so that both see the same load from the rest of
the machine: C client threads for S seconds, each holding one keep-alive HTTP connection and posting query
photos of the run's query split (multipart, k=10) one after another. Reported per run: requests/s, latency
p50/p95/p99, errors (anything but HTTP 200), the server's mean batch size, the mean embedding and search time
of a batch (the answers' `timings_ms`), and the server's resident memory (VmRSS) before and after; at the end
each server's memory after warm-up and now, and the median requests/s of both settings at each C. The
servers are stopped at the end, whatever happens; the bench takes about 2 x len(C) x repeat x S seconds plus
the start-ups.

Clients and servers share the machine's cores; the clients are light (prebuilt requests, the answers' JSON
parsed for the server timings), but on a small machine their share is part of what is measured.
docs/benchmarks.md has results.
"""

import argparse
import collections
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np

from jaxret import embedding
from jaxret import input_pipeline
from jaxret.catalog import milvus

HOST = "127.0.0.1"  # Loopback only: the bench never sends requests to another machine.
SETTINGS = {"batching on": ["--max_batch", "32", "--max_wait_ms", "5"], "batching off": ["--max_batch", "1"]}


def free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def query_photos(workdir: str, data_dir: str | None, count: int) -> list[bytes]:
  """JPEG bytes of the first `count` images of the run's query split."""
  config = embedding.load_run_config(workdir)
  builder = input_pipeline.get_builder(config.input.dataset, data_dir or config.data_dir, prepare=False)
  source = input_pipeline.read_split(builder, "query")
  return [source[i]["image"] for i in range(min(count, len(source)))]


def multipart(photo: bytes, k: int) -> tuple[bytes, str]:
  """A `POST /search` body with the photo and k, and its content type."""
  boundary = uuid.uuid4().hex
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
          f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
          "Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def rss_mib(pid: int) -> float:
  """Resident memory of a process (Linux /proc), MiB."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f"No VmRSS for process {pid}.")


def get_json(port: int, path: str, timeout: float = 10) -> dict:
  with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
    return json.loads(response.read())


def client_loop(port: int, requests: list[tuple[bytes, str]], stop_at: float, offset: int):
  """Posts requests one after another until `stop_at`.

  Returns:
    `(latencies in s of HTTP 200 answers, the answers' server timings {name: [ms]}, errors)`.
  """
  latencies, timings, errors = [], collections.defaultdict(list), 0
  connection = http.client.HTTPConnection(HOST, port, timeout=60)
  i = offset
  while time.perf_counter() < stop_at:
    body, content_type = requests[i % len(requests)]
    i += 1
    start = time.perf_counter()
    try:
      connection.request("POST", "/search", body=body, headers={"Content-Type": content_type})
      response = connection.getresponse()
      answer = response.read()
      if response.status == 200:
        latencies.append(time.perf_counter() - start)
        for name, ms in json.loads(answer)["timings_ms"].items():
          timings[name].append(ms)
      else:
        errors += 1
    except (OSError, http.client.HTTPException):
      errors += 1
      connection.close()
      connection = http.client.HTTPConnection(HOST, port, timeout=60)
  connection.close()
  return latencies, timings, errors


def load(port: int, requests, clients: int, seconds: float) -> dict:
  """C clients for S seconds: requests/s, latency percentiles (ms), errors, the server's mean timings (ms)."""
  stop_at = time.perf_counter() + seconds
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda c: client_loop(port, requests, stop_at, c * 7), range(clients)))
  latencies = np.concatenate([np.asarray(r[0]) for r in results]) * 1e3
  errors = sum(r[2] for r in results)
  p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (np.nan,) * 3
  server_ms = {f"server_{name}_ms": float(np.mean([ms for r in results for ms in r[1][name]]))
               for name in ("decode", "queue", "embed", "search") if any(r[1][name] for r in results)}
  return {"clients": clients, "requests": int(len(latencies)), "requests_per_s": len(latencies) / seconds,
          "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "errors": int(errors), **server_ms}


def start_server(args, uri: str, flags: list[str], log) -> tuple[subprocess.Popen, int]:
  port = free_port()
  command = [sys.executable, "-m", "jaxret.serve", "--workdir", args.workdir, "--uri", uri, "--host", HOST,
             "--port", str(port), "--max_queue", "1024", *flags]
  if args.data_dir:
    command += ["--data_dir", args.data_dir]
  if args.collection:
    command += ["--collection", args.collection]
  server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + args.startup_timeout
  while True:
    if server.poll() is not None:
      raise RuntimeError(f"The server stopped (status {server.returncode}); see {log.name}.")
    try:
      get_json(port, "/healthz", timeout=5)
      return server, port
    except OSError:
      if time.time() > deadline:
        server.kill()
        raise RuntimeError(f"The server did not answer within {args.startup_timeout} s; see {log.name}.") from None
      time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
  server.terminate()
  try:
    server.wait(timeout=30)
  except subprocess.TimeoutExpired:
    server.kill()
    server.wait()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="Training run whose catalogue is served.")
  parser.add_argument("--uri", required=True, help="Its Milvus catalogue (PATH.db or http://host:19530).")
  parser.add_argument("--collection", default=None, help="Its collection (default: the server's default).")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir of the run's dataset (query photos).")
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="Concurrent clients C.")
  parser.add_argument("--seconds", type=float, default=20, help="Duration S of each run.")
  parser.add_argument("--warmup_seconds", type=float, default=5, help="Load before measuring (not reported).")
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  parser.add_argument("--repeat", type=int, default=1,
                      help="Runs of each C per setting (the settings take turns); more runs show the memory over "
                           "time and give medians on a noisy machine.")
  parser.add_argument("--startup_timeout", type=float, default=600)
  parser.add_argument("--out", default=None, help="Also write the results as JSON lines here.")
  args = parser.parse_args()

  requests = [multipart(photo, args.k) for photo in query_photos(args.workdir, args.data_dir, 64)]
  print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {len(requests)} query photos, k={args.k}, S={args.seconds:g} s")
  print("| setting | C | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | server embed + search ms "
        "per batch | server RSS MiB before -> after |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  rows, servers, workspace = [], {}, tempfile.mkdtemp(prefix="serve_load_")
  try:
    for setting in args.settings:
      uri = args.uri
      if milvus.is_lite(uri) and len(args.settings) > 1:
        # Milvus Lite lets one process open a database: each server gets its own copy.
        uri = os.path.join(workspace, setting.replace(" ", "_") + ".db")
        shutil.copytree(args.uri, uri, ignore=shutil.ignore_patterns("LOCK"))
      log = open(os.path.join(workspace, setting.replace(" ", "_") + ".log"), "w")  # noqa: SIM115  (closed with its server)
      servers[setting] = (*start_server(args, uri, SETTINGS[setting], log), log)
    first_rss = {}
    for setting, (server, port, _) in servers.items():
      load(port, requests, 8, args.warmup_seconds)
      first_rss[setting] = rss_mib(server.pid)
    # The settings take turns at each C, so that both see the same load from the rest of the machine.
    for clients in args.clients:
      for _ in range(args.repeat):
        for setting, (server, port, _) in servers.items():
          before = get_json(port, "/healthz")["batching"]
          rss_before = rss_mib(server.pid)
          result = load(port, requests, clients, args.seconds)
          after = get_json(port, "/healthz")["batching"]
          batches = after["batches"] - before["batches"]
          result.update(setting=setting, rss_before_mib=rss_before, rss_after_mib=rss_mib(server.pid),
                        mean_batch=(after["requests"] - before["requests"]) / batches if batches else 0.0)
          rows.append(result)
          print(f"| {setting} | {clients} | {result['requests_per_s']:.1f} | {result['p50_ms']:.1f} | "
                f"{result['p95_ms']:.1f} | {result['p99_ms']:.1f} | {result['errors']} | "
                f"{result['mean_batch']:.1f} | {result.get('server_embed_ms', np.nan):.0f} + "
                f"{result.get('server_search_ms', np.nan):.0f} | {rss_before:.0f} -> "
                f"{result['rss_after_mib']:.0f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    for setting, (server, _, _) in servers.items():
      print(f"{setting}: server RSS {first_rss[setting]:.0f} MiB after warm-up, {rss_mib(server.pid):.0f} MiB "
            "at the end")
    if "batching on" in servers and "batching off" in servers:
      for clients in args.clients:
        median = {setting: np.median([r["requests_per_s"] for r in rows
                                      if r["setting"] == setting and r["clients"] == clients])
                  for setting in servers}
        print(f"C={clients}: median requests/s batching on {median['batching on']:.1f}, off "
              f"{median['batching off']:.1f}: {median['batching on'] / median['batching off']:.2f}x")
  finally:
    for server, _, log in servers.values():
      stop_server(server)
      log.close()
  shutil.rmtree(workspace, ignore_errors=True)
  if args.out:
    with open(args.out, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
