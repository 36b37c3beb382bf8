"""Log routing: actor processes write into runs/<run>/logs/, the driver keeps a readable terminal."""
import json
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from retro_dist.launch.logs import RunLogs, redirect_process_output, with_output_redirect


def _child(code: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, **kw)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_redirect_takes_python_c_level_and_child_output(tmp_path):
    proc = _child(f"""
        import logging, os, subprocess, sys
        from retro_dist.launch.logs import redirect_process_output
        print("before redirect", flush=True)
        path = redirect_process_output({str(tmp_path / "logs")!r}, "worker-3")
        print("python print")
        sys.stderr.write("python stderr\\n")
        os.write(1, b"c-level fd1\\n")
        os.write(2, b"c-level fd2\\n")
        logging.getLogger("x").warning("a log record")
        subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"])
        print(path)
    """)
    assert proc.stdout == "before redirect\n" and proc.stderr == ""  # nothing after the redirect on the terminal
    text = (tmp_path / "logs" / "worker-3.log").read_text()
    assert text.startswith("--- worker-3: pid ")
    for line in ("python print", "python stderr", "c-level fd1", "c-level fd2", "a log record",
                 "child stdout", "child stderr", str(tmp_path / "logs" / "worker-3.log")):
        assert line + "\n" in text, line


def test_redirect_appends(tmp_path):
    for word in ("first", "second"):
        _child(f"""
            from retro_dist.launch.logs import redirect_process_output
            redirect_process_output({str(tmp_path)!r}, "learner")
            print({word!r})
        """)
    text = (tmp_path / "learner.log").read_text()
    assert text.index("first") < text.index("second") and text.count("--- learner: pid") == 2


def test_with_output_redirect_keeps_the_plain_class_and_its_name(tmp_path):
    proc = _child(f"""
        from retro_dist.launch.logs import with_output_redirect

        class Worker:
            def __init__(self, a, b=0):
                print("constructed", a, b)
                self.total = a + b

        Redirected = with_output_redirect(Worker)
        assert Redirected.__name__ == "Worker" and issubclass(Redirected, Worker)
        Worker(1)  # the plain class: still on the terminal
        w = Redirected({str(tmp_path)!r}, "worker-0", 2, b=3)
        print("total", w.total)
    """)
    assert proc.stdout == "constructed 1 0\n"
    text = (tmp_path / "worker-0.log").read_text()
    assert "constructed 2 3\n" in text and "total 5\n" in text


def test_driver_records_file_and_terminal(tmp_path):
    # A fresh interpreter, as the driver is: Ray and vLLM configure their loggers when imported, so
    # in this test process the result would depend on which tests ran before.
    proc = _child(f"""
        import logging, warnings
        from retro_dist.launch.logs import RunLogs
        logs = RunLogs({str(tmp_path)!r})
        try:
            log = logging.getLogger("retro_dist.test_logs")
            log.info("an info record")
            log.warning("a warning record")
            warnings.warn("a library deprecation", FutureWarning)
            logging.getLogger("ray._private.authentication.x").warning("token notice")
            logging.getLogger("vllm.triton_utils.importing").warning("early vllm record")
        finally:
            logs.close()
        logging.getLogger("retro_dist.test_logs").warning("after close")  # handlers are gone again
    """)
    driver = (tmp_path / "logs" / "driver.log").read_text()
    assert "an info record" in driver and "a warning record" in driver
    assert "a library deprecation" in driver and "token notice" in driver and "early vllm record" in driver
    assert proc.stdout == ""
    assert proc.stderr.startswith("retro-dist: WARNING retro_dist.test_logs: a warning record\n")
    assert "after close" not in driver


def test_vllm_logging_config_sends_vllm_records_to_a_file(tmp_path):
    logs = RunLogs(tmp_path)
    try:
        env_vars = logs.env_vars()
        config = json.loads(logs.vllm_config.read_text())
    finally:
        logs.close()
    assert env_vars == {"VLLM_LOGGING_CONFIG_PATH": str(logs.vllm_config.resolve())}
    assert config["loggers"]["vllm"]["propagate"] is False
    # what vLLM does with the file at import: dictConfig it; records of its loggers land in logs/vllm.log
    proc = _child(f"""
        import json, logging.config, logging
        logging.config.dictConfig(json.load(open({str(logs.vllm_config)!r})))
        logging.getLogger("vllm.engine").info("engine started")
        logging.getLogger("vllm").warning("a vllm warning")
    """)
    assert proc.stdout == "" and proc.stderr == ""
    text = (tmp_path / "logs" / "vllm.log").read_text()
    assert "INFO [<string>:4] engine started" in text and "WARNING [<string>:5] a vllm warning" in text


@pytest.mark.integration
def test_ray_actor_output_goes_to_files_not_the_driver(tmp_path, capfd):
    ray = pytest.importorskip("ray")

    class Echo:
        def __init__(self, word):
            import os
            print("constructed", word)
            os.write(2, b"c-level write from the actor\n")

        def env(self):
            import os
            return os.environ.get("VLLM_LOGGING_CONFIG_PATH")

    logs = RunLogs(tmp_path)
    try:
        ctx = ray.init(num_cpus=1, _node_ip_address="127.0.0.1", include_dashboard=False,
                       **logs.ray_init_kwargs({"TOKENIZERS_PARALLELISM": "false"}))
        link = logs.link_ray_session(ctx)
        actor = ray.remote(with_output_redirect(Echo)).options(num_cpus=1).remote(str(logs.dir), "worker-0", "hi")
        assert ray.get(actor.env.remote()) == str(logs.vllm_config.resolve())
    finally:
        ray.shutdown()
        logs.close()
    out, err = capfd.readouterr()
    assert "constructed" not in out + err and "c-level" not in out + err and "Started a local Ray" not in out + err
    text = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "constructed hi\n" in text and "c-level write from the actor\n" in text
    assert "Started a local Ray instance" in (tmp_path / "logs" / "driver.log").read_text()
    assert link is not None and link.is_symlink() and link.resolve().name == "logs"
