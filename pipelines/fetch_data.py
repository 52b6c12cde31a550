"""`agenttuning fetch-data NAME [--from ZIP_OR_URL] [--dest DIR]`: optional data too large to ship.

Only what no default config or test needs stays out of the repository (see data/README.md):

* ``alfworld-train``: the 360 ALFWorld training games named by ``data/alfworld/train_subset.json``
  (33 MB; ALFWorld trajectory collection, the CPU miniature). Taken from ALFWorld's own release
  archive of the text-world PDDL games (the URL ``alfworld-download`` uses), of which only the
  listed games are extracted, to ``<dest>/alfworld/json_2.1.1/train/...``.

``--from`` takes the archive from a local file (an offline mirror) instead of downloading it;
``--dest`` defaults to ``$AGENTTUNING_DATA_DIR`` or the checkout's ``data/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from typing import List, Optional

from agenttuning.paths import ENV_VAR, REPO_DATA, data_file

log = logging.getLogger(__name__)

# ALFWorld 0.4's text-world PDDL games (`alfworld-download`'s TW_PDDL_FILES_URL).
ALFWORLD_TW_PDDL_URL = "https://github.com/alfworld/alfworld/releases/download/0.4.0/json_2.1.2_tw-pddl.zip"


def _archive(source: str, tmp: str) -> str:
    if os.path.isfile(source):
        return source
    path = os.path.join(tmp, os.path.basename(source))
    log.info("downloading %s", source)
    try:
        with urllib.request.urlopen(source, timeout=60) as r, open(path, "wb") as f:  # noqa: S310 — fixed https URL or user's
            shutil.copyfileobj(r, f)
    except OSError as exc:
        raise SystemExit(f"error: cannot download {source}: {exc}\n"
                         "(no internet here? download it elsewhere and pass --from FILE)") from None
    return path


def fetch_alfworld_train(source: str, dest: str) -> List[str]:
    """Extract the games of train_subset.json from ALFWorld's archive into dest; returns their paths."""
    with open(data_file("alfworld/train_subset.json"), encoding="utf-8") as f:
        wanted = list(json.load(f)["train"])
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(_archive(source, tmp)) as z:
        # The archive's top folder differs between releases (json_2.1.1/ or json_2.1.2/): match on
        # the part after it, which is what train_subset.json names.
        by_tail = {name.split("/", 1)[1]: name for name in z.namelist() if "/" in name}
        missing = [w for w in wanted if w.split("/", 1)[1] not in by_tail]
        if missing:
            raise SystemExit(f"error: {len(missing)} of {len(wanted)} games are not in {source} "
                             f"(first: {missing[0]})")
        written = []
        for w in wanted:
            out = os.path.join(dest, "alfworld", w)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(by_tail[w.split("/", 1)[1]]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(out)
    return written


FETCHERS = {"alfworld-train": (fetch_alfworld_train, ALFWORLD_TW_PDDL_URL)}


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="agenttuning fetch-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(FETCHERS))
    parser.add_argument("--from", dest="source", help="archive file or URL (default: the official release)")
    parser.add_argument("--dest", help=f"data folder (default: ${ENV_VAR} or {REPO_DATA})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fn, url = FETCHERS[args.name]
    dest = args.dest or os.environ.get(ENV_VAR) or str(REPO_DATA)
    written = fn(args.source or url, dest)
    print(f"{args.name}: {len(written)} files under {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
