"""Training logs: `metrics.jsonl` (one object per logged step) and TensorBoard event files.

In a bucket neither can be appended to: each write uploads the whole file again (one object,
whole or not at all), as TensorBoard's own cloud writers do.
"""

import io
import json
import os
import sys

from etils import epath
from tensorboardX import SummaryWriter, record_writer

from ella_jax import storage


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard scalars in WORKDIR."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
        """Entries after `resume_step` (logged by a run that stopped before its next checkpoint)
        are dropped, so a resumed run does not log a step twice; so is a last line cut short by
        a killed run (said on stderr). Another line that is not a metrics entry is an error."""
        self.path = storage.path(workdir) / "metrics.jsonl"
        self.lines = []  # all of them, for a store that cannot append
        if self.path.exists():
            self.lines = [line for entry, line in read_entries(self.path)
                          if entry["step"] <= resume_step]  # fmt: skip
            self.path.write_text("".join(line + "\n" for line in self.lines))
        self.tensorboard = SummaryWriter(os.fspath(self.path.parent))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.lines.append(json.dumps({"step": step, **metrics}))
        if storage.is_remote(self.path):
            self.path.write_text("".join(line + "\n" for line in self.lines))
        else:
            with self.path.open("a") as f:
                f.write(self.lines[-1] + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self.tensorboard.close()


def read_entries(path: epath.Path) -> list[tuple[dict, str]]:
    """(entry, line) of each line of a metrics.jsonl; a last line cut short (no newline, not
    JSON: the writer was killed) is left out with a warning, any other bad line is a ValueError
    naming the file and line."""
    text = path.read_text()
    lines = text.splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                print(f"warning: {path}:{number}: dropped a cut-short last line", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number}: not a metrics entry ({e})") from None
        entries.append((entry, line))
    return entries


class _BucketEventFile:
    """A TensorBoard event file in a bucket: written whole at every flush."""

    def __init__(self, path: str):
        self.path, self.buffer = storage.path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    open = staticmethod(_BucketEventFile)

    def directory_check(self, path: str) -> None:
        pass  # buckets have no folders to make


for _scheme in ("gs", "s3"):  # tensorboardX's own use google-cloud-storage and boto3 directly
    record_writer.register_writer_factory(_scheme, _BucketEventFiles())
