"""The stage cache: skip a piece of work when its marker holds the same inputs, else do it and write the
marker atomically. One implementation for every resumable step of bgmask (the demo's stages and runs,
the zoo's candidates, the sweep's evaluations, generated datasets, predicted and perturbed mask folders).

A marker is a JSON object in a file. It is written only after the work it describes is whole (`run`),
or, for a folder filled file by file, before the first file (`claim`), so a rerun with the same inputs
resumes the folder and a rerun with other inputs never mixes two kinds of files. A marker that is
missing, unreadable or not a JSON object counts as "other inputs": the work runs again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bgmask.errors import UserError
from bgmask.io import atomic_write_text, is_empty_folder, read_json_object, remove_stale_temp


class Marker:
    """The marker file at `path`; `fields` (default: every key of the inputs) are the ones compared."""

    def __init__(self, path: str | Path, fields=None):
        self.path = Path(path)
        self.fields = tuple(fields) if fields is not None else None

    def saved(self) -> dict:
        return read_json_object(self.path)

    def holds(self, inputs: dict, key: str | None = None) -> bool:
        """Whether the marker records these inputs (under `key`, or as the marker object itself)."""
        if not self.path.is_file():
            return False
        saved = self.saved()
        saved = saved.get(key, {}) if key else saved
        if not isinstance(saved, dict):
            return False
        keys = self.fields if self.fields is not None else tuple(inputs)
        if self.fields is None and key and set(saved) != set(inputs):
            return False
        return all(saved.get(k) == inputs.get(k) for k in keys)

    def write(self, record: dict) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2))

    def run(self, inputs: dict, fn, fresh: bool = False):
        """(result, seconds): fn()'s result and its duration, or the saved result and None when the marker
        holds `inputs` (and not `fresh`). The marker records {"inputs", "result", "seconds"}; `fn` returns
        JSON-serialisable data."""
        if not fresh and self.holds(inputs, key="inputs"):
            return self.saved().get("result"), None
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.write({"inputs": inputs, "result": result, "seconds": seconds})
        return result, seconds

    def claim(self, folder: str | Path, inputs: dict, overwrite: bool, refusal, record: dict | None = None,
              text: str | None = None, *, clear=None, keep_unmarked: bool = False) -> bool:
        """Make `folder` the home of outputs of `inputs`, before its first file is written. True when the
        folder already held them (the caller resumes it: finished files are kept). A folder of other inputs
        (or a non-empty one without the marker) is replaced with `overwrite`, else refused with
        `refusal` (one line; `{saved}` in it is the saved marker; or a function of the saved marker that
        returns the line). The marker then holds `record` (default: the inputs), written as `text` when
        given (a file whose exact bytes matter).

        `clear(folder)` removes the old outputs before a replacement (default: the whole folder, for an
        output folder that holds nothing else). With `keep_unmarked`, a folder without the marker is taken
        as it is and its files count as finished: for an output folder the user may share with other
        files, which must be neither refused nor deleted."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"output folder {folder} exists and is not a folder")
        resumed = self.holds(inputs)
        taken = self.path.is_file() if keep_unmarked else not is_empty_folder(folder)
        if not resumed and taken:
            if not overwrite:
                saved = self.saved()
                raise UserError(refusal(saved) if callable(refusal) else refusal.format(saved=saved))
            (clear or shutil.rmtree)(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(folder, recursive=True)  # half-written files of a killed run
        if text is not None:
            atomic_write_text(self.path, text)
        else:
            self.write(record if record is not None else inputs)
        return resumed


def say(prefix: str, name: str, seconds: float | None, what: str = "") -> None:
    """The one line a stage prints: `[demo] data: up to date, skipped` (seconds None: `Marker.run` skipped
    it) or `[demo] data: WHAT, done in 3 s`."""
    if seconds is None:
        print(f"[{prefix}] {name}: up to date, skipped", flush=True)
    else:
        print(f"[{prefix}] {name}: {what + ', ' if what else ''}done in {seconds:.0f} s", flush=True)
