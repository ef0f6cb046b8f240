"""Issue 12: every input bounded, every output valid, every failure one line (never a traceback)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from estimator import EstimatorError, __version__
from estimator.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "estimator"]


def fails(args: list[str], expected: str, code: int = 2) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity, as an RFC 8259 parser does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- item 2: world size bounded
@pytest.mark.parametrize(("args", "expected"), [
    (["estimate", "--parallel", "ddp", "-n", "0"], "--world-size: expected at least 1 rank, got 0"),
    (["estimate", "--parallel", "ddp", "-n", "-1"], "--world-size: expected at least 1 rank, got -1"),
    (["estimate", "--parallel", "ddp", "-n", "1048577"], "--world-size: at most 1,048,576 ranks"),
    (["verify", "--parallel", "ddp", "-n", "100000"], "ranks on this machine (4 x its"),
    (["verify", "--parallel", "ddp", "-n", "0"], "--world-size: expected at least 1 rank"),
])
def test_item2_world_size_bounded(args: list[str], expected: str) -> None:
    fails(args, expected)


def test_item2_verify_parallel_counts_each_rank_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 1 GiB free, 3 ranks need 3 x (320 MiB + the step): over 80% of it, refused before spawning."""
    pytest.importorskip("torch")
    import estimator.measure.distributed as dist
    import estimator.measure.verify as verify

    monkeypatch.setattr(verify, "free_bytes", lambda device: 1 << 30)
    monkeypatch.setattr(dist, "measure_distributed", lambda *a, **k: pytest.fail("ranks were started"))
    assert dist.RANK_PROCESS_BYTES == 320 << 20
    fails(["verify", "--parallel", "ddp", "-n", "3"], "this step on 3 ranks needs about 960")
    monkeypatch.setattr(verify, "free_bytes", lambda device: 4 << 30)  # 2 ranks: 640 MiB < 80% of 4 GiB
    monkeypatch.setattr(dist, "measure_distributed", lambda *a, **k: (_ for _ in ()).throw(EstimatorError("ran")))
    fails(["verify", "--parallel", "ddp", "-n", "2"], "error: ran")


# --------------------------------------------------------------------------- item 4: --plot checked first
@pytest.mark.parametrize("path", ["/proc/x.png", "/sys/x.png", "/nonexistent-dir/x.png"])
def test_item4_unwritable_plot_refused_before_any_work(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import estimator.api
    from estimator import cli

    if not Path(path).parent.exists() and not path.startswith("/nonexistent"):
        pytest.skip(f"{Path(path).parent} does not exist here")
    monkeypatch.setattr(estimator.api, "estimate", lambda *a, **k: pytest.fail("estimated before the check"))
    monkeypatch.setattr(cli, "_import_torch_side", lambda: pytest.fail("verify started before the check"))
    fails(["estimate", "--plot", path], f"--plot {path}")
    fails(["verify", "--plot", path], f"--plot {path}")


def test_item4_plot_to_a_read_only_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    tmp_path.chmod(0o500)
    try:
        fails(["estimate", "--plot", str(tmp_path / "x.png")], "cannot write there")
    finally:
        tmp_path.chmod(0o700)


# --------------------------------------------------------------------------- item 5: stdout failures
def run_cli(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=kwargs.pop("capture_output", True), timeout=120, cwd=ROOT,
                          **kwargs)


@pytest.mark.parametrize("args", [["estimate"], ["estimate", "--json"], ["schema"], ["--version"]])
def test_item5_stdout_full(args: list[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*CLI, *args], stdout=full, stderr=subprocess.PIPE, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.decode() == "error: cannot write to stdout: No space left on device\n"


def test_item5_stdout_closed() -> None:
    proc = subprocess.run([*CLI, "estimate"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                          cwd=ROOT, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: stdout is closed")


def test_item5_broken_pipe_exits_141() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([*CLI, "estimate", "--json"], stdout=write, stderr=subprocess.PIPE, timeout=120,
                              cwd=ROOT)
    finally:
        os.close(write)
    assert proc.returncode == 141
    assert proc.stderr.decode() == "error: cannot write to stdout: Broken pipe\n"


# --------------------------------------------------------------------------- item 6: signals during verify --parallel
def _start_parallel(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, "TMPDIR": str(tmp_path), "ESTIMATOR_TEST_MARK": mark}
    proc = subprocess.Popen([*CLI, "verify", "--parallel", "ddp", "-n", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    # the fork server and both ranks forked from it (once it has imported torch) share its command line
    while len(_processes_with(mark, b"multiprocessing.forkserver")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    assert list(tmp_path.glob("estimator-dist-*"))
    return proc, mark


def _processes_with(mark: str, command: bytes = b"") -> list[int]:
    """Processes whose environment holds ``mark`` (and whose command line holds ``command``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes() and command in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize(("sig", "code", "group"), [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)])
def test_item6_signal_cleans_up(tmp_path: Path, sig: signal.Signals, code: int, group: bool) -> None:
    """SIGTERM to the parent, or Ctrl-C (SIGINT to the whole process group): one line, no leftovers."""
    pytest.importorskip("torch")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    proc, mark = _start_parallel(tmp_path)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert err.decode().splitlines() == [
        f"error: interrupted by {sig.name}; stopped the 2 ranks and removed their temporary directory"]
    assert out == b""
    assert not list(tmp_path.glob("estimator-dist-*"))
    time.sleep(0.5)
    assert _processes_with(mark) == []


# --------------------------------------------------------------------------- item 7: strict JSON
def test_item7_json_is_strict() -> None:
    from estimator.output import strict_json

    with pytest.raises(EstimatorError, match="not a finite number"):
        strict_json({"lr": float("inf")})
    for args in (["estimate", "--json"], ["estimate", "-m", "gpt2", "--gpu", "h100-sxm", "--json"],
                 ["compare", "--json"], ["optimizers", "--json"], ["gpus", "--json"], ["schema"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        strict_loads(result.stdout)
    fails(["estimate", "--set", "optimizer.lr=.inf", "--json"], "optimizer.lr: expected a finite number")
    fails(["estimate", "--set", "model.kwargs={x: .nan}", "--set", "model.module=a.b:c"],
          "model.kwargs.x: expected a finite number, got nan")


# --------------------------------------------------------------------------- item 8: user stdout under --json
FACTORY = '''
import os
import torch


def build():
    print("hello from the factory")
    os.write(1, b"raw bytes on fd 1\\n")
    return torch.nn.Linear(4, 1, bias=False)
'''


def test_item8_factory_stdout_goes_to_stderr(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "chatty_factory_mod.py").write_text(FACTORY)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  module: chatty_factory_mod:build\n  inputs: [{shape: [2, 4]}]\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([*CLI, "estimate", str(config), "-d", "cpu", "--json"], capture_output=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert strict_loads(proc.stdout.decode())["parameters"] == 4
    assert "hello from the factory" in proc.stderr.decode() and "raw bytes on fd 1" in proc.stderr.decode()


# --------------------------------------------------------------------------- item 18: --help and --version
@pytest.mark.parametrize("command", [[], ["estimate"], ["compare"], ["verify"], ["optimizers"], ["models"],
                                     ["gpus"], ["schema"]])
def test_item18_help_has_no_bool_metavars(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "--help" in result.stdout


def test_item18_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"estimator {__version__}\n"


# --------------------------------------------------------------------------- item 21: a module config is code
def test_item21_docs_say_a_module_config_runs_code() -> None:
    for doc in ("README.md", "docs/module.md"):
        text = (ROOT / doc).read_text()
        assert "trusted source" in text and "runs code" in text, doc


# --------------------------------------------------------------------------- item 22: plot file mode
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_item22_plot_respects_umask(tmp_path: Path, umask: int, mode: int) -> None:
    pytest.importorskip("matplotlib")
    old = os.umask(umask)
    try:
        result = runner.invoke(app, ["estimate", "--plot", str(tmp_path / "t.png")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "t.png").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]  # no temporary file left behind


# --------------------------------------------------------------------------- the wrapper: unexpected errors
def test_unexpected_exception_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import estimator.api

    monkeypatch.setattr(estimator.api, "estimate", lambda *a, **k: {}["boom"])
    fails(["estimate"], "error: internal error: KeyError: 'boom' -- please report it", code=1)
    monkeypatch.setenv("ESTIMATOR_DEBUG", "1")
    result = runner.invoke(app, ["estimate"])
    assert isinstance(result.exception, KeyError)


def test_error_lines_escape_control_characters() -> None:
    """User text echoed in a message cannot break it into several lines (\\n, \\x1e are shown escaped)."""
    err = fails(["estimate", "--set", "training.x\x1e=[1,\n2]"], "error: --set training.x\\x1e=[1,\\n2]: training has")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("args", "expected"), [
    (["estimate", "-b", "x"], "error: Invalid value for '--batch-size' / '-b'"),
    (["estimate", "--nope"], "error: No such option: --nope"),
    (["nope"], "error: No such command 'nope'."),
    (["estimate", "--set"], "error: Option '--set' requires an argument."),
])
def test_usage_errors_are_one_line(args: list[str], expected: str) -> None:
    """Typer's own usage errors: one error line naming the option and where help is, exit 2."""
    err = fails(args, expected)
    assert "--help')" in err or args[-1] == "--set"  # a missing value is found before the command is known


def test_item6_an_interrupt_while_ranks_are_created_waits_until_they_are_known() -> None:
    """A forked rank exists before the parent has read its pid: an interrupt then is held until every rank
    is known, so the run's cleanup can stop them all (a rank left behind held the terminal's pipes)."""
    pytest.importorskip("torch")
    from estimator.errors import Interrupted
    from estimator.measure.distributed import _Stop

    stop = _Stop(2)
    with pytest.raises(Interrupted), stop.deferred():
        stop(signal.SIGTERM, None)  # held: nothing raised here
        created = True
    assert created
    with pytest.raises(Interrupted):
        stop(signal.SIGINT, None)  # outside the block: at once


def test_item6_a_rank_ends_when_the_run_that_started_it_is_gone() -> None:
    """A rank watches the process that started the run (its own parent is the fork server, which lives on
    while a rank holds its pipe): killed outright, that process leaves no rank waiting for a peer."""
    pytest.importorskip("torch")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = ("import time\nfrom estimator.measure.distributed import _stop_with_the_parent\n"
            f"_stop_with_the_parent({gone.pid})\ntime.sleep(30)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, cwd=ROOT)
    assert proc.returncode == 1 and time.monotonic() - started < 25
