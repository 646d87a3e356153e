"""What browsing the MLflow UI costs a training run on the same machine.

Trains the same run twice on the built-in data (default MobileNetV2 config): alone, then with
`scripts/mlflow_ui.sh` serving the store and a headless chromium reloading the runs page every few
seconds. Prints the UI's processes and resident memory and the epoch times (from each run's
`time/epoch_s`, first epoch left out: it traces the model):

    python scripts/bench_ui.py [--epochs 4] [--reload-every 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--reload-every", type=float, default=3.0, help="seconds between page reloads")
    parser.add_argument("--port", type=int, default=5097)
    parser.add_argument("--client", choices=["chromium", "http"], default="chromium",
                        help="who reloads: a headless chromium rendering the page, or plain HTTP calls of the "
                             "page's own runs search (the server's share of the cost)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ui_") as tmp:
        work = Path(tmp)
        store = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
        alone = train(work, store, args.epochs, "alone")
        ui = subprocess.Popen([str(ROOT / "scripts" / "mlflow_ui.sh"), str(args.port), store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(f"http://127.0.0.1:{args.port}/health")
            processes, resident = group_usage(ui.pid)
            stop = threading.Event()
            client = reload_runs_page if args.client == "chromium" else search_runs_over_http
            browser = threading.Thread(target=client, args=(args.port, args.reload_every, stop), daemon=True)
            browser.start()
            time.sleep(10)  # the page is open before training starts
            browsing = train(work, store, args.epochs, "with the UI")
            stop.set()
            browser.join(timeout=60)
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=60)
    print(f"\nMLflow UI (scripts/mlflow_ui.sh): {processes} processes, {resident:.0f} MB resident\n")
    print("| training run | median epoch (s) | epochs |")
    print("| --- | --- | --- |")
    who = "in headless chromium" if args.client == "chromium" else "as HTTP calls"
    for name, epochs in (("alone", alone), (f"UI open, runs page reloaded every {args.reload_every:g} s {who}",
                                            browsing)):
        print(f"| {name} | {statistics.median(epochs):.2f} | {', '.join(f'{e:.2f}' for e in epochs)} |")
    print(f"\nwith the UI / alone = {statistics.median(browsing) / statistics.median(alone):.3f}x (target <= 1.05x)")


def train(work: Path, store: str, epochs: int, name: str) -> list[float]:
    """One training run; its epoch times after the first."""
    import mlflow

    command = [sys.executable, str(ROOT / "train.py"), f"trainer.epochs={epochs}", "trainer.early_stopping_patience=0",
               f"paths.cache_dir={work / 'cache'}", f"paths.output_dir={work}", f"tracking.uri={store}",
               f"tracking.run_name={name}"]
    subprocess.run(command, check=True, capture_output=True, timeout=3600)
    client = mlflow.tracking.MlflowClient(store)
    [run] = client.search_runs(["1"], filter_string=f"attributes.run_name = '{name}'")
    history = sorted(client.get_metric_history(run.info.run_id, "time/epoch_s"), key=lambda m: m.step)
    return [m.value for m in history[1:]]


def reload_runs_page(port: int, every: float, stop: threading.Event) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/#/experiments/1?workflowType=machine_learning", wait_until="load")
        while not stop.wait(every):
            page.reload(wait_until="load")
            page.get_by_text("matching runs").wait_for(timeout=60_000)
        browser.close()


def search_runs_over_http(port: int, every: float, stop: threading.Event) -> None:
    import json

    body = json.dumps({"experiment_ids": ["1"], "max_results": 100}).encode()
    while not stop.wait(every):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def group_usage(group: int) -> tuple[int, float]:
    """Live processes of a process group and their resident memory (MB), from /proc."""
    count, resident = 0, 0.0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            stat = (status.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == group and stat[0] != "Z":
            count += 1
            resident += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    return count, resident


if __name__ == "__main__":
    main()
