"""The allocator cap the app sets at start-up (ui/memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"


def _run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(env_extra)
    code = "from ui.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="the cap is glibc's")
def test_the_cap_is_set_on_glibc():
    assert _run({}) == "True"


def test_a_chosen_malloc_arena_max_is_left_alone():
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False"

