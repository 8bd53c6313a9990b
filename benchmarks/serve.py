"""``lego serve`` under load: bounded concurrent clients on 127.0.0.1, streaming WikiText-2 valid prompts.

For each decoding (full depth, and ``--draft_exit auto --num_speculations auto``) a server is
started on a free port of 127.0.0.1 with ``--slots`` slots, and for each number of clients every
client sends streamed completions one after the other for ``--seconds`` (``max_tokens`` drawn from
``--max-tokens``), then waits for its last answer. Reported: requests sent, answered, failed and lost
(sent with no answer when the client gave up), completion tokens per second, time to first token
and latency (p50, p99), and the server's tokens per second over the engine's offline at the batch
the server decodes (what serving costs). One untimed request first: auto measures its round costs on
its first request, once per server (seconds on 2 cores). The server is stopped with SIGTERM at the
end of its runs. ``--resume`` keeps the rows already in the results.

    python -m benchmarks.serve                  # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import DEFAULT_DATA, REPO, add_resume_arguments, index_runs, resumed_runs, write_results
from benchmarks.speculative import MODELS, load_prompts
from lego_lightning import ExitTransformer
from lego_lightning.decoding import Engine, Request

SERVER_LOG = Path(tempfile.gettempdir()) / "lego_serve_benchmark.log"  # the server's output, for a failed start
DECODINGS = {"full depth": [], "auto": ["--draft_exit", "auto", "--num_speculations", "auto"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, slots: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exits = json.loads((folder / "lego_exits.json").read_text())["exits"]  # the CLI's default is the last only
    command = [sys.executable, "-m", "lego_lightning.cli", "serve", "--model.pretrained", str(folder),
               "--model.exits", json.dumps(exits), "--port",
               str(port), "--slots", str(slots), "--max_queue", "256", *extra]  # fmt: skip
    log = open(SERVER_LOG, "w")  # noqa: SIM115 - the server writes to it until it stops
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"lego serve did not start within 180 s: see {SERVER_LOG}")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def one_request(url: str, prompt: list[int], max_tokens: int, timeout: float) -> dict[str, Any]:
    """A streamed completion: its status, time to first token, latency and completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                return {"status": response.status_code}
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500}
                if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.TimeoutException:
        return {"status": "lost"}
    return {"status": 200, "ttft": first, "latency": time.perf_counter() - start, "tokens": tokens}


def load(url: str, prompts: list[list[int]], clients: int, seconds: float, lengths: list[int], seed: int) -> dict:
    """``clients`` threads, each sending one request after the other until ``seconds`` have passed."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            result = one_request(url, rng.choice(prompts), rng.choice(lengths), timeout=120)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    latency = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)

    def pct(values: list[float], q: float) -> float | None:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else None)

    return {
        "sent": len(results),
        "answered": len(ok),
        "failed": sum(r["status"] not in (200, "lost") for r in results),
        "lost": sum(r["status"] == "lost" for r in results),
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "latency_p50": pct(latency, 50),
        "latency_p99": pct(latency, 99),
    }


def offline_tokens_per_s(model: ExitTransformer, prompts: list[list[int]], lengths: list[int], batch: int,
                         draft: dict[str, Any], seed: int) -> float:  # fmt: skip
    """The engine in this process at ``batch`` slots (what the server decodes at once with that many clients), on
    requests drawn as the clients draw them; auto's one-off cost measurement is made before the timing."""
    engine = Engine(model, batch, max_speculations=8)
    engine.add(Request(prompts[0], max_new_tokens=max(lengths), **draft))
    engine.run()
    rng = random.Random(seed)
    for _ in range(max(16, 2 * batch)):
        engine.add(Request(rng.choice(prompts), max_new_tokens=rng.choice(lengths), **draft))
    start = time.perf_counter()
    done = engine.run()
    return sum(len(c.tokens) for c in done.values()) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="layerskip")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-tokens", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "serve")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("model", "seconds", "slots", "max_tokens", "prompt_tokens")}
    runs, earlier = resumed_runs(args, "rows", settings)

    def key(r: dict[str, Any]) -> tuple:
        return (r["decoding"], r["clients"])

    done = index_runs(runs, key)
    folder = MODELS[args.model]
    prompts = load_prompts(folder, args.data, 64, args.prompt_tokens).tolist()
    model = ExitTransformer.from_pretrained(folder).eval()
    for decoding, flags in DECODINGS.items():
        todo = [c for c in args.clients if (decoding, c) not in done]
        if not todo:
            continue
        process, url = start_server(folder, args.slots, flags)
        rows = []
        try:
            # Untimed: auto measures its round costs on its first request (seconds), once per server.
            one_request(url, prompts[0], max(args.max_tokens), timeout=300)
            for clients in todo:
                rows.append({"decoding": decoding, "clients": clients}
                            | load(url, prompts, clients, args.seconds, args.max_tokens, seed=clients))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        finally:
            exit_code = stop_server(process)
        draft = {"draft_exit": "auto", "num_speculations": "auto"} if flags else {}
        for row in rows:  # offline, once the server has stopped: nothing else runs on the cores
            batch = min(row["clients"], args.slots)
            with torch.no_grad():
                offline = offline_tokens_per_s(model, prompts, args.max_tokens, batch, draft, seed=row["clients"])
            row |= {"server_exit_code": exit_code, "offline_batch": batch, "offline_tokens_per_s": offline,
                    "server_over_offline": row["tokens_per_s"] / offline}  # fmt: skip
            done[key(row)] = row
        ordered = sorted(done.values(), key=key)
        write_results(args.name, ordered, report(ordered, args), extra={"settings": settings, "resumed_from": earlier})


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    out = [
        "# `lego serve` under load",
        "",
        f"Model `{args.model}` (seed 0), {args.slots} slots, WikiText-2 valid prompts of {args.prompt_tokens} "
        f"tokens, `max_tokens` drawn from {args.max_tokens}, every request streamed; each client sends one request "
        f"after the other for {args.seconds:.0f} s. Server and clients share this machine's cores. `server / offline`: "
        "the server's tokens per second over the engine's in the benchmark's process at the batch the server decodes "
        "(the clients, at most the slots), same decoding, requests drawn alike, timed after the server stopped. "
        "`server exit`: the server's exit status after SIGTERM.",
        "",
        "| decoding | clients | sent | answered | failed | lost | tokens/s | TTFT p50 ms | TTFT p99 ms | "
        "latency p50 ms | latency p99 ms | server / offline | server exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['decoding']} | {r['clients']} | {r['sent']} | {r['answered']} | {r['failed']} | {r['lost']} | "
            f"{r['tokens_per_s']:.0f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['latency_p50'])} | "
            f"{ms(r['latency_p99'])} | {r['server_over_offline']:.2f} (batch {r['offline_batch']}) | "
            f"{r['server_exit_code']} |"
        )
    by = {(r["decoding"], r["clients"]): r for r in rows}
    speedups = [f"{c} clients {by[('auto', c)]['tokens_per_s'] / by[('full depth', c)]['tokens_per_s']:.2f}x"
                for c in args.clients if ("auto", c) in by and ("full depth", c) in by]  # fmt: skip
    lost = sum(r["lost"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    out += ["", "Auto over full depth behind the same server, tokens per second: " + ", ".join(speedups) + ". "
            f"Requests lost: {lost} (target 0); failed: {failed}."]  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
