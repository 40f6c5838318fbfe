"""Execute a notebook headless and save the executed copy: ``python -m medseg.run_notebook NOTEBOOK [--out DIR]``.

The stored notebook is never modified (it is kept without outputs); the executed copy goes to ``--out``
(default ``outputs/notebooks``). Used by ``make notebook`` and by the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from medseg.io import atomic_path


def run_notebook(path: str | Path, out_dir: str | Path = "outputs/notebooks", timeout: int = 900) -> tuple[Path, int]:
    """Execute every cell of ``path`` (working directory: the current one) and write the executed copy.

    Returns:
        The executed notebook's path and the number of figures (PNG outputs) it produced.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the message holds the cell's traceback).
    """
    path, out_dir = Path(path), Path(out_dir)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(Path.cwd())}}).execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    with atomic_path(target) as tmp:
        nbformat.write(notebook, tmp)
    figures = sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    return target, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.run_notebook", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=Path("outputs/notebooks"), help="folder for the executed copy")
    args = parser.parse_args(argv)
    try:
        target, figures = run_notebook(args.notebook, args.out)
    except CellExecutionError as err:
        print(f"{args.notebook}: a cell failed:\n{err}", file=sys.stderr)
        return 1
    print(f"Executed {args.notebook} -> {target} ({figures} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
