"""Helper of scripts/screenshots.sh (a docs tool, not tested): find the ids of the pages to shoot through the Prefect
API, and take a headless-Chromium screenshot of a page as a small palette PNG.

    python scripts/screenshots.py ids                 -> "<latest flow run id> <its loss-curve artifact id>"
    python scripts/screenshots.py shoot URL FILE.png  -> FILE.png, 1400x1000, under ~300 KB
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

WINDOW = "1400,1000"
WAIT_MS = 15000  # virtual time for the Prefect UI (a single-page app) to load its data and draw the graph


async def ids() -> str:
    """The newest flow run on the server and the newest `loss-curve` artifact of that run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not runs:
            raise SystemExit("no flow run on the server")
        run = runs[0]
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["loss-curve"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])
            ),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
        if not artifacts:
            raise SystemExit(f"flow run {run.id} has no loss-curve artifact")
        return f"{run.id} {artifacts[0].id}"


def shoot(url: str, out: Path) -> None:
    """Headless Chromium's screenshot of ``url`` (``--no-sandbox`` as root), re-encoded as a 256-colour PNG."""
    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "shot.png"
        cmd = ["chromium", "--headless", f"--screenshot={raw}", f"--window-size={WINDOW}", "--hide-scrollbars"]
        cmd += [f"--virtual-time-budget={WAIT_MS}", f"--user-data-dir={profile}/data", url]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        image = Image.open(raw).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB from {url}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["ids"]:
        print(asyncio.run(ids()))
    elif argv[:1] == ["shoot"] and len(argv) == 3:
        shoot(argv[1], Path(argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
