"""Training logs: `metrics.jsonl` (one object per logged step) and TensorBoard event files."""

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard scalars in WORKDIR."""

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        """Entries after `resume_step` (logged by a run that stopped before its next checkpoint)
        are dropped, so a resumed run does not log a step twice."""
        self.path = Path(workdir) / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = SummaryWriter(str(workdir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self.tensorboard.close()
