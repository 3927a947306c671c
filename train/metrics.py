"""Training logs: `metrics.jsonl` (one object per logged step) and TensorBoard event files."""

import json
import sys
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard scalars in WORKDIR."""

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        """Entries after `resume_step` (logged by a run that stopped before its next checkpoint)
        are dropped, so a resumed run does not log a step twice; so is a last line cut short by
        a killed run (said on stderr). Another line that is not a metrics entry is an error."""
        self.path = Path(workdir) / "metrics.jsonl"
        if self.path.exists():
            kept = [line for entry, line in read_entries(self.path) if entry["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = SummaryWriter(str(workdir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self.tensorboard.close()


def read_entries(path: Path) -> list[tuple[dict, str]]:
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
