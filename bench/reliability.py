#!/usr/bin/env python3
"""Reliability figures of a real server process on loopback, with the tiny conformance models:

  overload  320 concurrent /generate requests against a queue of 32: every answer must be 200
            or 429; reports the counts, latency of the admitted ones and the server's peak RSS.
  soak      a fine-tuning job while the server is killed with SIGKILL five times at random
            moments and restarted: the job must complete with one metrics row per step, an
            adapter that loads, and a SQLite database that passes PRAGMA integrity_check.
  fuzz      schemathesis over every operation of openapi/openapi.json with API keys on: no
            answer may be a 5xx (needs `pip install schemathesis`).

  python3 bench/reliability.py [overload soak fuzz] [--bin target/release/dspo-server]
                               [--out bench/results/reliability] [--seed 1]

Writes one JSON file per test into --out and prints a summary; exits 1 if a check fails.
Uses only the standard library (and schemathesis for `fuzz`)."""
import argparse, concurrent.futures, json, os, random, shutil, signal, sqlite3, subprocess
import sys, tempfile, threading, time, urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "..", "shared", "conformance", "models")
SHAPES = os.path.join(ROOT, "..", "shared", "shapes")
KEY = "reliability-key-0123456789"


class Server:
    """`dspo-server serve` on a free loopback port; tracks its peak RSS while it runs."""

    def __init__(self, binary, data_dir, *args, env=None):
        self.cmd = [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir, *args]
        self.env = dict(os.environ, RUST_LOG="info", **(env or {}))

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=self.env, text=True)
        self.log = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.log[-20:]))
            self.log.append(line)
            if "listening on http://" in line:
                addr = line.split("listening on http://")[1].split()[0].rstrip("\x1b[0m")
                self.base = "http://" + "".join(c for c in addr if c.isdigit() or c in ".:")
                break
        threading.Thread(target=self._drain, daemon=True).start()
        for _ in range(600):
            if request(self.base + "/ready")[0] == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError("server never became ready")

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def peak_rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()


def request(url, body=None, method=None, key=None, timeout=300):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    if data is not None:
        req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return None, str(e).encode()


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def overload(args, work):
    server = Server(args.bin, os.path.join(work, "data"), "--model",
                    f"tiny={os.path.join(MODELS, 'tiny-sd15')}", "--set", "batching.queue_size=32").start()
    n = 320
    body = {"prompt": "a red circle", "steps": 4, "seed": 1}
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        t0 = time.perf_counter()
        status, _ = request(server.base + "/generate", dict(body, seed=i))
        return status, time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    rss = server.peak_rss_mib()
    health = request(server.base + "/health")[0]
    server.stop()
    counts = {}
    for s, _ in results:
        counts[str(s)] = counts.get(str(s), 0) + 1
    ok = [t for s, t in results if s == 200]
    out = {"requests": n, "queue_size": 32, "status_counts": counts, "wall_s": round(wall, 2),
           "admitted_p50_s": round(percentile(ok, 50), 3) if ok else None,
           "admitted_p99_s": round(percentile(ok, 99), 3) if ok else None,
           "refused_p99_s": round(percentile([t for s, t in results if s == 429], 99) or 0, 3),
           "peak_rss_mib": round(rss, 1) if rss else None, "health_after": health}
    out["passed"] = set(counts) <= {"200", "429"} and health == 200 and "200" in counts
    return out


def soak(args, work):
    data = os.path.join(work, "data")
    www = os.path.join(work, "www")
    os.makedirs(www)
    shutil.copy(os.path.join(SHAPES, "prefs_centered.parquet"), os.path.join(www, "prefs.parquet"))
    files = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                             cwd=www, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = files.stdout.readline().split("port ")[1].split()[0]
    steps = 300
    serve_args = ["--model", f"tiny={os.path.join(MODELS, 'tiny-sd15')}", "--allow-private-dataset-urls"]
    server = Server(args.bin, data, *serve_args).start()
    spec = {"dataset_url": f"http://127.0.0.1:{port}/prefs.parquet", "method": "dspo", "adapter_name": "soak",
            "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
            "hyperparameters": {"max_steps": steps, "batch_size": 2, "max_pairs": 64, "learning_rate": 1e-3,
                                "resolution": 64, "warmup_steps": 0, "checkpoint_every": 2}}
    status, body = request(server.base + "/finetune", spec)
    assert status == 202, body
    job = json.loads(body)["job_id"]
    kills = []
    rng = random.Random(args.seed)
    for _ in range(5):
        # Kill at a random moment while it trains (waits for training to have started).
        for _ in range(600):
            j = json.loads(request(f"{server.base}/finetune/{job}")[1])
            if j["status"] == "training" and (j.get("progress") or {}).get("step", 0) >= 1:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 1.5))
        step = (json.loads(request(f"{server.base}/finetune/{job}")[1]).get("progress") or {}).get("step")
        server.kill9()
        kills.append(step)
        server = Server(args.bin, data, *serve_args).start()
    t0 = time.time()
    while time.time() - t0 < 900:
        j = json.loads(request(f"{server.base}/finetune/{job}")[1])
        if j["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    metrics = json.loads(request(f"{server.base}/finetune/{job}/metrics")[1])
    w_status, weights = request(server.base + "/adapters/soak/weights")
    server.stop()
    files.terminate()
    header_ok = False
    if w_status == 200 and len(weights) > 8:
        n = int.from_bytes(weights[:8], "little")
        header = json.loads(weights[8:8 + n])
        header_ok = any(k.endswith("lora_A.weight") or "lora" in k for k in header)
    db = sqlite3.connect(os.path.join(data, "jobs.sqlite"))
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    db.close()
    got_steps = [m["step"] for m in metrics]
    out = {"steps": steps, "kills": 5, "killed_at_steps": kills, "final_status": j["status"],
           "metric_steps_contiguous": got_steps == list(range(1, steps + 1)),
           "adapter_loads": header_ok, "sqlite_integrity": integrity}
    out["passed"] = (j["status"] == "completed" and out["metric_steps_contiguous"] and header_ok
                     and integrity == "ok")
    return out


def fuzz(args, work):
    if shutil.which("schemathesis") is None:
        return {"skipped": "schemathesis is not installed (pip install schemathesis)", "passed": True}
    server = Server(args.bin, os.path.join(work, "data"), "--model",
                    f"tiny-sd15={os.path.join(MODELS, 'tiny-sd15')}", "--model",
                    f"tiny-ip2p={os.path.join(MODELS, 'tiny-ip2p')}",
                    env={"DSPO_AUTH_API_KEYS": KEY, "DSPO_JOBS_WEBHOOK_SECRET":
                         "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}).start()
    report = os.path.join(work, "fuzz.json")
    cmd = ["schemathesis", "run", os.path.join(ROOT, "openapi", "openapi.json"), "--url", server.base,
           "-H", f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error",
           "--max-examples", str(args.examples), "--seed", str(args.seed), "--workers", "2",
           "--report", "ndjson", "--report-ndjson-path", report]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=work)  # its cache goes there
    health = request(server.base + "/health")[0]
    server.stop()
    tail = [l for l in run.stdout.strip().splitlines()[-12:] if l.strip() and "NDJSON" not in l
            and not l.startswith("Reports")]
    shown = ["schemathesis", "run", "openapi/openapi.json", "--url", "<server>", "-H",
             "'Authorization: Bearer <key>'"] + cmd[7:14]
    out = {"command": " ".join(shown), "exit": run.returncode,
           "summary": tail, "health_after": health}
    out["passed"] = run.returncode == 0 and health == 200
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs="*", default=["overload", "soak", "fuzz"])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "dspo-server"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "reliability"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--examples", type=int, default=100, help="schemathesis examples per operation")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for name in args.tests:
        work = tempfile.mkdtemp(prefix=f"dspo-reliability-{name}-")
        t0 = time.time()
        result = {"overload": overload, "soak": soak, "fuzz": fuzz}[name](args, work)
        result["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(name, json.dumps(result))
        if not result["passed"]:
            failed.append(name)
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("FAILED:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
