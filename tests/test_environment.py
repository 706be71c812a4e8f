import json
import os
import subprocess
import sys

import numpy
import pytest
import timm
import torch

from lookhere.environment import describe, environment, is_x86, kernel_pin


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def test_environment_reports_this_process():
    env = environment()
    assert (env["torch"], env["numpy"], env["timm"]) == (torch.__version__, numpy.__version__, timm.__version__)
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
    assert json.loads(json.dumps(env)) == env  # goes into JSON records as it is
    line = describe(env)
    assert torch.__version__ in line and env["torch_cpu_capability"] in line and env["cpu"] in line


@pytest.mark.skipif(not is_x86() or "avx2" not in _cpu_flags(), reason="the AVX2 pin needs an x86-64 CPU with AVX2")
def test_the_pinned_capability_is_the_one_torch_dispatches_to():
    """What a study sets for its cells (the AVX2 pin) is what torch then runs and what the record says,
    with the settings themselves recorded."""
    code = "import json; from lookhere.environment import environment; print(json.dumps(environment()))"
    pin = kernel_pin("avx2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **pin, "OMP_NUM_THREADS": "1"}).stdout
    env = json.loads(out)
    assert env["torch_cpu_capability"] == "AVX2" and env["threads"] == 1
    assert {k: env["settings"][k] for k in pin} == pin == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def test_an_unknown_capability_is_named():
    if is_x86():
        with pytest.raises(ValueError, match="cpu capability 'avx3'; allowed: default, avx2, avx512"):
            kernel_pin("avx3")
    assert kernel_pin(None) == {}
