"""A tuned ``final/`` wherever LitGPT users use a model: the Python ``LLM``, ``generate``, ``chat`` and ``serve``."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import litgpt.deploy.serve
import psutil
import pytest
import torch
from conftest import in_process, run

from litgpt_skip2lora import LLM
from litgpt_skip2lora.api import trained_precision
from litgpt_skip2lora.model import default_precision

PROMPT = "what is the colour of the cat ?"
VARIANTS = {
    "adapters": {},
    "tail": dict(skip2lora_output_layer="block.3", lora_query=True, lora_value=True),
    "nf4": dict(quantize="bnb.nf4"),  # bitsandbytes needs a CUDA GPU
}


def command(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "litgpt_skip2lora", *args], capture_output=True, text=True, env=env, **kwargs
    )


@pytest.fixture(scope="module")
def finals(tiny_checkpoint: Path, alpaca_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """``final/`` of a variant, trained once for the module for one epoch in the machine's default precision (32-true
    on the CPU)."""
    trained: dict[str, Path] = {}

    def final_of(variant: str) -> Path:
        if variant == "nf4" and not torch.cuda.is_available():
            pytest.skip("--quantize needs a CUDA GPU")
        if variant not in trained:
            out_dir = tmp_path_factory.mktemp(variant)
            run(tiny_checkpoint, alpaca_file, out_dir, epochs=1, precision=None, **VARIANTS[variant])
            trained[variant] = out_dir / "final"
        return trained[variant]

    return final_of


@pytest.fixture(params=list(VARIANTS))
def final(request: pytest.FixtureRequest, finals) -> Path:
    return finals(request.param)


def test_llm_load_generates_what_the_generate_command_does(final: Path, capsys: pytest.CaptureFixture) -> None:
    expected_precision = default_precision()
    assert trained_precision(final) == expected_precision  # recorded, though the command line left it unset
    llm = LLM.load(str(final))
    answer = llm.generate(PROMPT, temperature=0, max_new_tokens=4)
    assert llm.model.transformer.wte.weight.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    capsys.readouterr()
    in_process("generate", str(final), "--prompt", PROMPT, "--temperature", "0", "--max_new_tokens", "4")
    printed = capsys.readouterr()
    assert answer.strip() and printed.out.strip().endswith(answer.strip())
    assert "checkpoint_dir" not in printed.out and " with {" not in printed.err  # no dump of arguments or config


def test_chat_ends_cleanly_at_the_end_of_its_input(finals) -> None:
    """As a user's process, its input a pipe that ends."""
    done = command("chat", str(finals("adapters")), "--max_new_tokens", "3", input=f"{PROMPT}\n")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert ">> Reply:" in done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int, within: float) -> bool:
    """Whether a process of the group ``pgid`` is still alive after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.2)


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, str]:
    """The server's status and text for a ``/predict`` request of ``body``."""
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


BAD_REQUESTS = [
    b'{"prompt": "the cat',  # not JSON
    b"{}",
    b'["the cat"]',
    b'{"prompt": 3}',
    b'{"prompt": "the cat", "max_new_tokens": -1}',
    b'{"prompt": "the cat", "max_new_tokens": 1000000000}',
]


def test_a_served_model_answers_as_the_llm_does(finals) -> None:
    """Under load on the loopback: bad requests get a 4xx with one line, 32 at once get the LLM's answer, and a
    SIGTERM with requests in flight stops every process and frees the port."""
    pytest.importorskip("litserve")
    final = finals("adapters")
    port = free_port()
    args = [sys.executable, "-m", "litgpt_skip2lora", "serve", str(final), "--port", str(port)]
    args += ["--temperature", "0", "--max_new_tokens", "4", "--accelerator", "cpu"]
    # a session of its own: LitServe's workers are the server's children, and all of them must stop with the test
    output = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = subprocess.Popen(args, **output, start_new_session=True)
    try:
        deadline, reply = time.monotonic() + 120, None
        while reply is None and time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/predict",
                    data=json.dumps({"prompt": PROMPT}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    reply = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert reply is not None, server.stderr.read()[-3000:] if server.poll() is not None else "no answer in 120 s"
        listening = {
            c.laddr.ip for c in psutil.net_connections("inet") if c.laddr.port == port and c.status == "LISTEN"
        }
        assert listening == {"127.0.0.1"}  # the loopback only, unless --host says otherwise
        for body in BAD_REQUESTS:
            status, text = post(port, body, timeout=10)
            assert 400 <= status < 500 and text.count("\n") == 0, (body, status, text)
        good = json.dumps({"prompt": PROMPT}).encode()
        with ThreadPoolExecutor(32) as pool:
            answers = [(status, json.loads(text)) for status, text in pool.map(lambda _: post(port, good), range(32))]
            assert answers == [(200, reply)] * 32
            in_flight = [pool.submit(post, port, good) for _ in range(8)]
            server.send_signal(signal.SIGTERM)  # a plain `kill PID`, as systemd, Docker and Kubernetes stop a service
            server.wait(timeout=30)
            for request in in_flight:  # answered, or cut by the stop: none hangs
                with contextlib.suppress(OSError):
                    status, text = request.result(timeout=30)
                    assert (status, json.loads(text)) == (200, reply)
        assert not group_alive(server.pid, within=15), "a worker outlived the server"
        with socket.socket() as s:  # the port is free again: no socket listens on it (closed connections may wait)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if group_alive(server.pid, within=0):
            os.killpg(server.pid, signal.SIGKILL)
    llm = LLM.load(str(final))
    assert reply == {"output": llm.generate(PROMPT, temperature=0, max_new_tokens=4)}


def test_serve_without_litserve_is_one_line(finals, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litserve", None)  # absent, as LitGPT sees it
    monkeypatch.setattr(litgpt.deploy.serve, "_LITSERVE_AVAILABLE", False)
    with pytest.raises(SystemExit) as refused:
        in_process("serve", str(finals("adapters")))
    assert refused.value.code == "error: serve needs LitServe: pip install 'litgpt-skip2lora[serve]'"
